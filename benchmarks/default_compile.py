"""Benchmark: ``compile`` straight from ReLU (no polyfy, no fine-tuning) on MNIST, per ReLU degree
(docs/accuracy.md#the-default-compile-path).

Two ReLU networks trained 5 epochs on the 5,000 MNIST training images: ``zoo.MnistNet`` (strided
convolution, BatchNorm) and a conv-MaxPool CNN.  Each is compiled with the compiler's own
Chebyshev fits of ReLU (``activation_degrees``: the default 15, then 7, 4, 2), calibrated on 512
training images; the table gives the compiled program's top-1 on the 10k test set (``simulate``),
its top-1 agreement with the ReLU model on the calibration images (what ``compile`` measures to
decide whether to warn), levels and ring.  Plan-level only: no encrypted run.

    .venv/bin/python benchmarks/default_compile.py
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h33_bento import compile, simulate, zoo  # noqa: E402


class PoolCNN(nn.Module):
    """conv 1->8 k3 -> ReLU -> MaxPool 2 -> conv 8->16 k3 -> ReLU -> MaxPool 2 -> fc 784->10."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(16 * 49, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def main() -> None:
    torch.set_num_threads(1)
    x, y = zoo._data("mnist", "train")
    xt, yt = zoo._data("mnist", "test")
    print("| network | ReLU top-1 (%) | ReLU degree (levels each) | compiled top-1 (%) | agreement on calibration "
          "inputs (%) | levels | ring |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for name, ctor in (("zoo.MnistNet", zoo.MnistNet), ("conv-MaxPool CNN", PoolCNN)):
        relu = zoo.train(ctor(), x, y, epochs=5)
        relu_acc = (zoo.predict_logits(relu, xt).argmax(1) == yt).mean()
        for degree, levels in ((15, 6), (7, 5), (4, 4), (2, 3)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MaxPool, AccuracyWarning, RangeWarning: measured here
                compiled = compile(relu, (1, 28, 28), calibration_data=x[:512], measure_costs=False,
                                   activation_degrees={"relu": degree})
                acc = (simulate(compiled, xt).argmax(1) == yt).mean()
                agree = (simulate(compiled, x[:512]).argmax(1) == zoo.predict_logits(relu, x[:512]).argmax(1)).mean()
            print(f"| {name} | {100 * relu_acc:.2f} | {degree} ({levels}){' default' if degree == 15 else ''} | "
                  f"{100 * acc:.2f} | {100 * agree:.1f} | {compiled.depth} | 2^{compiled.params.ring_dim.bit_length() - 1} |",
                  flush=True)


if __name__ == "__main__":
    main()
