"""Reference networks (PyTorch) and a small reproducible trainer.

These are the networks the tests, examples and benchmarks compile; every one uses only ops the
compiler supports.  Importing this module needs the ``torch`` extra.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Square(nn.Module):
    """x -> x^2: the cheapest polynomial activation (one ciphertext multiply, one level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


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
          batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain Adam training with a fixed seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Plaintext logits of a torch model, in float64 numpy."""
    return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
