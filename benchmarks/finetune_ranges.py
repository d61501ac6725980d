"""Benchmark: how many MNIST images leave a calibrated range after ``finetune`` with its defaults
(docs/accuracy.md#ranges-that-hold).

``zoo.MnistNet`` trained 5 epochs with ReLU on the 5,000 training images, then polyfied (ranges on
2,000 of them, 10% margin) and fine-tuned with the defaults (3 epochs, lr 1e-3, penalty 10) under four
option sets; for each: plaintext top-1 on the 10k test set, the share of training and test images with
some activation input out of range (``nn.out_of_range``), and whether ``finetune`` warned.

    .venv/bin/python benchmarks/finetune_ranges.py
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h33_bento import nn as hnn  # noqa: E402
from h33_bento import zoo  # noqa: E402
from h33_bento.errors import RangeWarning  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    x, y = zoo._data("mnist", "train")
    xt, yt = zoo._data("mnist", "test")
    relu = zoo.train(zoo.MnistNet(), x, y, epochs=5)
    print(f"ReLU top-1 {100 * (zoo.predict_logits(relu, xt).argmax(1) == yt).mean():.2f}%\n")
    print("| polyfy / finetune options | top-1 (%) | training images out of range | test images out of range | "
          "finetune warned | fine-tuning time |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for label, polyfy_kw, finetune_kw in (
            ("fixed coefficients, no teacher", {}, {}),
            ("`trainable=True`, `teacher=`", {"trainable": True}, {"teacher": relu}),
            ("`trainable=True`, `teacher=`, `freeze_bn=True`", {"trainable": True}, {"teacher": relu, "freeze_bn": True}),
            ("fixed coefficients, `freeze_bn=True`", {}, {"freeze_bn": True})):
        model = copy.deepcopy(relu)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RangeWarning)
            hnn.polyfy(model, x[:2000], **polyfy_kw)
        history: list[dict] = []
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RangeWarning)
            hnn.finetune(model, (x, y), history=history, **finetune_kw)
        seconds = time.perf_counter() - t0
        warned = any("after fine-tuning" in str(w.message) for w in caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RangeWarning)
            acc = (zoo.predict_logits(model, xt).argmax(1) == yt).mean()
        test = hnn.out_of_range(model, xt)
        print(f"| {label} | {100 * acc:.2f} | {history[-1]['out_of_range']:.2%} | {test.share:.2%} | "
              f"{'yes' if warned else 'no'} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
