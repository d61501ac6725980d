"""Reference networks (PyTorch) and a small reproducible trainer.

These are the networks the tests, examples and benchmarks compile; every one uses only ops the
compiler supports (or, built with ``nn.ReLU``, converts with :func:`h33_bento.nn.polyfy`).

* MNIST-scale, small enough to run encrypted without bootstrapping: :class:`ConvNet` (the
  benchmark network), :class:`MnistCNN`, :class:`LolaMnist` (LoLA / CryptoNets style),
  :class:`LeNet5` (the Orion variant), :class:`MnistNet`, :class:`PneumoniaCNN`, :class:`CifarCNN`
  (a small 32x32 CNN) and :class:`TabularMLP`; :data:`RECIPES` + :func:`train_recipe` train them
  reproducibly (fixed seed) on the shared datasets.
* CIFAR-scale (32x32) versions of ResNet-18, VGG-16, MobileNet-V2 and EfficientNet-B0 with
  polynomial activations and average pooling (:func:`resnet18`, :func:`vgg16`,
  :func:`mobilenet_v2`, :func:`efficientnet_b0`).  They compile to plans; running them
  encrypted needs bootstrapping.

Importing this module needs the ``torch`` extra.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .nn import Square, _BestEpoch, _lr_scheduler, polyfy

__all__ = [
    "Square", "ConvNet", "MnistCNN", "LolaMnist", "LeNet5", "MnistNet", "PneumoniaCNN", "CifarCNN", "TabularMLP",
    "resnet18", "resnet20", "vgg16", "mobilenet_v2", "efficientnet_b0", "CIFAR_ARCHITECTURES", "RECIPES", "train_recipe",
    "train", "random_crop_flip", "predict_logits",
]

Act = Callable[[], nn.Module]


class ConvNet(nn.Module):
    """The benchmark network: conv 1->4 k7 s3 -> x^2 -> fc 256->64 -> x^2 -> fc 64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=7, stride=3)
        self.act1 = Square()
        self.fc1 = nn.Linear(256, 64)
        self.act2 = Square()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv(x))
        x = self.act2(self.fc1(x.flatten(1)))
        return self.fc2(x)


class MnistCNN(nn.Module):
    """Conv + BatchNorm + x^2 + average pooling + dense layers: exercises BN folding and fusion."""

    def __init__(self, channels: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2)
        self.bn = nn.BatchNorm2d(channels)
        self.act1 = Square()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(channels * 7 * 7, hidden)
        self.act2 = Square()
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn(self.conv(x))))
        x = self.act2(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 5, lr: float = 2e-3,
          batch_size: int = 64, seed: int = 0, *, lr_schedule: str = "constant",
          augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
          validation: tuple[Any, Any] | None = None, history: list[dict[str, float]] | None = None) -> nn.Module:
    """Adam training (cross-entropy) with a fixed seed; returns the model in eval mode.

    ``lr_schedule`` is ``"constant"`` or ``"cosine"`` (annealed to 0 over all batches);
    ``augment`` is applied to every batch (e.g. :func:`random_crop_flip`); with ``validation``
    (an ``(x, y)`` pair) the model returned is the one of the epoch with the best top-1 on it.
    One dict per epoch (``epoch`` from 0, mean ``loss``, ``val_accuracy`` with ``validation``, a fraction
    in [0, 1]) is appended to ``history`` when given.  These are the same options as
    :func:`h33_bento.nn.finetune`, so a polynomial model can be fine-tuned like its original was trained.
    """
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = _lr_scheduler(opt, lr_schedule, epochs * -(-len(xt) // batch_size))
    best = _BestEpoch(model, validation)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            xb = xt[idx] if augment is None else augment(xt[idx])
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(idx)
        record = {"epoch": epoch, "loss": total / max(len(xt), 1)}
        if validation is not None:
            record["val_accuracy"] = best.update(epoch)
        if history is not None:
            history.append(record)
    best.restore()
    return model.eval()


def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The usual CIFAR augmentation of a batch (N, C, H, W): each image mirrored left-right with
    probability 1/2, then cropped back to H x W at a random offset from the image zero-padded by
    ``padding`` on every side.  Draws from torch's global generator (seeded by ``train``/``finetune``)."""
    n, _, h, w = x.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # N, H + 2p, W + 2p, C
    dy = torch.randint(0, 2 * padding + 1, (n,))
    dx = torch.randint(0, 2 * padding + 1, (n,))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Plaintext logits of a torch model, in float64 numpy."""
    return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


# ------------------------------------------------------------------------------ small networks


class LolaMnist(nn.Module):
    """LoLA / CryptoNets-style MNIST net: conv 1->5 k5 s2 p1 -> x^2 -> fc 845->100 -> x^2 -> fc 100->10.

    Five levels: runs at N=2^14 without bootstrapping.
    """

    def __init__(self, act: Act = Square) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, kernel_size=5, stride=2, padding=1)
        self.act1 = act()
        self.fc1 = nn.Linear(5 * 13 * 13, 100)
        self.act2 = act()
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv(x))
        x = self.act2(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LeNet5(nn.Module):
    """LeNet-5 as in Orion: conv 1->32 k5 s2 p2, BN, x^2, conv 32->64 k5 s2 p2, BN, x^2,
    fc 3136->512, BN, x^2, fc 512->10 (seven levels with x^2: N=2^15)."""

    def __init__(self, act: Act = Square) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2), nn.BatchNorm2d(32), act(),
            nn.Conv2d(32, 64, kernel_size=5, stride=2, padding=2), nn.BatchNorm2d(64), act(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 512), nn.BatchNorm1d(512), act(), nn.Linear(512, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MnistNet(nn.Module):
    """conv 1->8 k5 s2 p2 + BN -> act -> fc 1568->64 + BN -> act -> fc 64->10.

    Built with ``nn.ReLU`` it is the "original" MNIST model of the accuracy report; polyfied with
    degree-4 PolyReLU it needs 11 levels (N=2^15).
    """

    def __init__(self, act: Act = nn.ReLU, channels: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act()
        self.fc1 = nn.Linear(channels * 14 * 14, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.act2 = act()
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv(x)))
        x = self.act2(self.bn2(self.fc1(x.flatten(1))))
        return self.fc2(x)


class PneumoniaCNN(nn.Module):
    """PneumoniaMNIST (1x28x28, 2 classes): conv 1->8 k3 s2 p1 + BN -> act -> conv 8->16 k3 s2 p1 + BN
    -> act -> avgpool 2 (ceil) -> fc 256->2.  Polyfied (degree-4 PolyReLU): 11 levels."""

    def __init__(self, act: Act = nn.ReLU, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(c1), act(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(c2), act(),
            nn.AvgPool2d(2, padding=1, count_include_pad=False),
        )
        self.fc = nn.Linear(c2 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class CifarCNN(nn.Module):
    """Small CIFAR-10 CNN (3x32x32): conv 3->c1 k3 s2 p1 + BN -> act -> conv c1->c2 k3 s2 p1 + BN -> act
    -> avgpool 2 -> fc (c2*16)->10.  Polyfied with degree-4 PolyReLU: 11 levels; with degree 13 (the
    accuracy report's recipe, docs/accuracy.md): 13 levels; N=2^16 either way, without bootstrapping."""

    def __init__(self, act: Act = nn.ReLU, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(c1), act(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(c2), act(),
            nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class TabularMLP(nn.Module):
    """Tabular classifier (default: the 30 features of sklearn's breast-cancer set, 2 classes):
    fc in->hidden + BN -> act -> fc hidden->classes.  Inputs are expected standardized."""

    def __init__(self, in_features: int = 30, hidden: int = 16, classes: int = 2, act: Act = Square) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x))))


# -------------------------------------------------------- CIFAR-scale (32x32) seed architectures
#
# Standard CIFAR variants (3x3 stems, no stem down-sampling) built with their usual activations
# and pooling, then converted by ``polyfy``: ReLU -> PolyReLU (degree 4), ReLU6 -> PolyReLU6,
# SiLU -> PolySiLU and Sigmoid -> PolySigmoid (degree 7), MaxPool -> AvgPool.  The ranges are
# placeholders until ``calibrate_ranges`` is run on data; they do not change the plan.


def _maybe_polyfy(model: nn.Module, poly: bool, degrees: dict[str, int] | None) -> nn.Module:
    if poly:
        polyfy(model, degrees=degrees)
    return model.eval()


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, four stages of two basic blocks, global average pool)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, c_in = [], w
        for c_out, stride in ((w, 1), (w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (8 * w, 2), (8 * w, 1)):
            blocks.append(_BasicBlock(c_in, c_out, stride))
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet18(num_classes: int = 10, width: int = 64, poly: bool = True,
             degrees: dict[str, int] | None = None) -> nn.Module:
    """CIFAR ResNet-18 (11.2M parameters at width 64), polyfied unless ``poly=False``."""
    return _maybe_polyfy(ResNet18(num_classes, width), poly, degrees)


class ResNet20(nn.Module):
    """He et al.'s ResNet-20 for CIFAR-10: a 3x3 stem, three stages of three basic blocks with
    16, 32 and 64 channels (stride 2 at the start of the last two, 1x1 projection shortcuts there),
    global average pooling and a linear classifier; 0.27M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (16, 1), (16, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1)):
            blocks.append(_BasicBlock(c_in, c_out, stride))
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet20(num_classes: int = 10, poly: bool = True, degrees: dict[str, int] | None = None) -> nn.Module:
    """CIFAR ResNet-20, polyfied unless ``poly=False``."""
    return _maybe_polyfy(ResNet20(num_classes), poly, degrees)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 for 32x32 inputs: 13 conv3x3 + BN + ReLU layers, five 2x2 poolings, one classifier."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = int(v) * width // 64
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg16(num_classes: int = 10, width: int = 64, poly: bool = True,
          degrees: dict[str, int] | None = None) -> nn.Module:
    """CIFAR VGG-16 (15M parameters at width 64), polyfied unless ``poly=False``."""
    return _maybe_polyfy(VGG16(num_classes, width), poly, degrees)


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


#: (expansion, channels, blocks, stride) with the CIFAR strides (first two stages stay 32x32).
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNet-V2 for 32x32 inputs: inverted residuals with depthwise 3x3 convolutions, ReLU6."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        blocks, c_in = [], 32
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                blocks.append(_InvertedResidual(c_in, c, t, s if i == 0 else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))


def mobilenet_v2(num_classes: int = 10, poly: bool = True, degrees: dict[str, int] | None = None) -> nn.Module:
    """CIFAR MobileNet-V2 (2.2M parameters), polyfied unless ``poly=False``."""
    return _maybe_polyfy(MobileNetV2(num_classes), poly, degrees)


class _SqueezeExcite(nn.Module):
    """x * sigmoid(fc(silu(fc(avgpool(x))))): the product of two tensors is a ciphertext multiply."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class _MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.SiLU(),
            _SqueezeExcite(hidden, max(1, c_in // 4)),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


#: (expansion, kernel, stride, channels, repeats) of EfficientNet-B0, CIFAR strides.
_EFFICIENTNET_B0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                    (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 for 32x32 inputs: MBConv blocks (depthwise, SiLU, squeeze-and-excitation)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        blocks, c_in = [], 32
        for t, k, s, c, n in _EFFICIENTNET_B0:
            for i in range(n):
                blocks.append(_MBConv(c_in, c, t, k, s if i == 0 else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))


def efficientnet_b0(num_classes: int = 10, poly: bool = True, degrees: dict[str, int] | None = None) -> nn.Module:
    """CIFAR EfficientNet-B0 (4.0M parameters), polyfied unless ``poly=False``."""
    return _maybe_polyfy(EfficientNetB0(num_classes), poly, degrees)


#: name -> constructor of the four CIFAR-scale seed architectures (input (3, 32, 32)).
CIFAR_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "vgg16": vgg16,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
}


# ------------------------------------------------------------------------- training recipes


def _breast_cancer(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's breast-cancer table, standardized with the training statistics; 75/25 split, seed 0."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.75 * len(x))
    train_idx, test_idx = order[:cut], order[cut:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
    idx = train_idx if split == "train" else test_idx
    return (x[idx] - mean) / std, y[idx]


def _data(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` is "train" or "test"; PneumoniaMNIST also has its official "val" split."""
    from . import datasets

    if name == "pneumonia":
        return datasets.pneumonia(split)
    if split not in ("train", "test"):
        raise ValueError(f"dataset {name!r} has no {split!r} split (train, test)")
    if name == "mnist":
        return datasets.mnist_train5k() if split == "train" else datasets.mnist_test()
    if name == "cifar10":
        return datasets.cifar10("train9000" if split == "train" else "test1000")
    if name == "breast_cancer":
        return _breast_cancer(split)
    raise ValueError(f"unknown dataset {name!r}")


#: name -> (constructor, dataset, input shape, epochs, learning rate) for the small networks.
RECIPES: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, ...], int, float]] = {
    "convnet": (ConvNet, "mnist", (1, 28, 28), 8, 2e-3),
    "mnist_cnn": (MnistCNN, "mnist", (1, 28, 28), 8, 2e-3),
    "lola_mnist": (LolaMnist, "mnist", (1, 28, 28), 8, 1e-3),
    "lenet5": (LeNet5, "mnist", (1, 28, 28), 6, 1e-3),
    "mnist_net": (MnistNet, "mnist", (1, 28, 28), 10, 2e-3),
    "pneumonia_cnn": (PneumoniaCNN, "pneumonia", (1, 28, 28), 10, 2e-3),
    "cifar_cnn": (CifarCNN, "cifar10", (3, 32, 32), 15, 2e-3),
    "tabular_mlp": (TabularMLP, "breast_cancer", (30,), 40, 2e-3),
}


def train_recipe(name: str, seed: int = 0, epochs: int | None = None) -> tuple[nn.Module, float]:
    """Train one of :data:`RECIPES` on its training split with ``seed``; return (model, test accuracy).

    Deterministic for a given seed, torch version and thread count (``torch.set_num_threads``).
    """
    ctor, dataset, _, default_epochs, lr = RECIPES[name]
    torch.manual_seed(seed)
    x, y = _data(dataset, "train")
    model = train(ctor(), x, y, epochs=epochs or default_epochs, lr=lr, seed=seed)
    xt, yt = _data(dataset, "test")
    return model, float((predict_logits(model, xt).argmax(1) == yt).mean())


if __name__ == "__main__":  # python -m h33_bento.zoo [name ...]: train recipes, print test accuracy
    import sys

    torch.set_num_threads(2)
    for recipe in sys.argv[1:] or list(RECIPES):
        _, acc = train_recipe(recipe)
        print(f"{recipe:<16} test accuracy {acc:.4f}")
