"""The benchmark networks as plain torch modules for our framework (project venv).

ConvNet, LeNet-5 and ResNet-20 come from ``h33_bento.zoo`` (``zoo.ConvNet``, ``zoo.LeNet5``, the
Orion variant; ``zoo.ResNet20`` with degree-2 ``PolyReLU`` activations, :func:`poly_resnet20`).
Orion's LoLA is built here from Orion's layer hyper-parameters unless the zoo gains one with the
same shapes (``zoo.LoLA``); the zoo's ``LolaMnist`` is a different network (k5 s2 p1, no
BatchNorm) and is not used.  Whatever module names a model uses, its weights are
exchanged under the canonical (Orion) names of ``common.LAYERS``.
"""
from __future__ import annotations

import torch
from torch import nn

from h33_bento import zoo
from h33_bento.nn import Square

from common import canonical_from_modules

#: canonical parameter shapes: a zoo model is used only if it matches them exactly.
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "convnet": {"conv.weight": (4, 1, 7, 7), "fc1.weight": (64, 256), "fc2.weight": (10, 64)},
    "lola": {"conv1.weight": (5, 1, 2, 2), "bn1.weight": (5,), "fc1.weight": (100, 980), "bn2.weight": (100,),
             "fc2.weight": (10, 100)},
    "lenet5": {"conv1.weight": (32, 1, 5, 5), "bn1.weight": (32,), "conv2.weight": (64, 32, 5, 5),
               "bn2.weight": (64,), "fc1.weight": (512, 3136), "bn3.weight": (512,), "fc2.weight": (10, 512)},
    "resnet20": {"stem.0.weight": (16, 3, 3, 3), "stem.2.coeffs": (3,), "layers.8.conv2.weight": (64, 64, 3, 3),
                 "fc.weight": (10, 64)},
}

#: learning rates of the zoo's recipes for the same kind of network.
LR = {"convnet": 2e-3, "lola": 1e-3, "lenet5": 1e-3}


class OrionLoLA(nn.Module):
    """orion.models.LoLA in torch: conv 1->5 k2 s2, BN, x^2, fc 980->100, BN, x^2, fc 100->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, kernel_size=2, stride=2, padding=0)
        self.bn1 = nn.BatchNorm2d(5)
        self.act1 = Square()
        self.fc1 = nn.Linear(980, 100)
        self.bn2 = nn.BatchNorm1d(100)
        self.act2 = Square()
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.fc1(x.flatten(1))))
        return self.fc2(x)


class OrionLeNet5(nn.Module):
    """orion.models.LeNet in torch (fallback when the zoo has no matching LeNet5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = Square()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, stride=2, padding=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = Square()
        self.fc1 = nn.Linear(3136, 512)
        self.bn3 = nn.BatchNorm1d(512)
        self.act3 = Square()
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc2(self.act3(self.bn3(self.fc1(x.flatten(1)))))


def poly_resnet20(weights: str | None = None) -> nn.Module:
    """ResNet-20 with every ReLU a degree-2 ``PolyReLU`` (the network ``benchmarks/accuracy.py
    --datasets resnet20 --save DIR`` trains), loaded with that state dict when ``weights`` is given."""
    model = zoo.resnet20(degrees={"relu": 2})
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _matches(model: nn.Module, net: str) -> bool:
    try:
        sd = canonical_from_modules(model, net)
    except ValueError:
        return False
    return all(tuple(sd[k].shape) == s for k, s in SHAPES[net].items())


def build(net: str) -> tuple[nn.Module, str]:
    """A fresh (untrained) torch model for ``net`` and where its definition came from."""
    candidates: list[tuple[str, type]] = []
    if net == "convnet":
        candidates = [("h33_bento.zoo.ConvNet", zoo.ConvNet)]
    elif net == "lola":
        candidates = [(f"h33_bento.zoo.{n}", getattr(zoo, n)) for n in ("LoLA", "Lola", "OrionLoLA")
                      if hasattr(zoo, n)]
        candidates.append(("benchmarks/peers/nets.py:OrionLoLA", OrionLoLA))
    elif net == "lenet5":
        candidates = [(f"h33_bento.zoo.{n}", getattr(zoo, n)) for n in ("LeNet5", "LeNet") if hasattr(zoo, n)]
        candidates.append(("benchmarks/peers/nets.py:OrionLeNet5", OrionLeNet5))
    elif net == "resnet20":
        candidates = [("h33_bento.zoo.resnet20(degrees={'relu': 2})", poly_resnet20)]
    else:
        raise ValueError(f"unknown network {net!r}")
    for origin, ctor in candidates:
        try:
            model = ctor()
        except TypeError:
            continue
        if _matches(model, net):
            return model, origin
    raise RuntimeError(f"no torch definition of {net} matches the canonical shapes")
