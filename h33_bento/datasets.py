"""Loaders for the real datasets the tests, examples and benchmarks use.

The data lives outside the repository (``../shared/data`` next to the project, or the directory
named by ``H33_DATA_DIR``); it is read in place and never copied.  Images come back as float
arrays scaled to [0, 1], shaped (N, C, H, W).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np


def data_dir() -> Path:
    """Where the shared datasets are: $H33_DATA_DIR, else ../shared/data from the project root."""
    env = os.environ.get("H33_DATA_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / "mnist").is_dir():
            return c
    raise FileNotFoundError(
        "shared datasets not found; set H33_DATA_DIR to the folder holding mnist/, pneumoniamnist/, cifar10/"
    )


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The official 10k MNIST test set: images (10000, 1, 28, 28) in [0, 1], labels (10000,)."""
    d = data_dir() / "mnist"
    images = _idx(d / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    return images[:, None], _idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)


def mnist_train5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST training images (500 per class)."""
    raw = np.loadtxt(data_dir() / "mnist" / "mnist_train5k.csv.gz", delimiter=",", dtype=np.float32)
    return (raw[:, :784] / 255.0).reshape(-1, 1, 28, 28), raw[:, 784].astype(np.int64)


def pneumonia(split: str) -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST split ('train', 'val' or 'test'): (N, 1, 28, 28) in [0, 1], labels 0/1."""
    with np.load(data_dir() / "pneumoniamnist" / "pneumoniamnist.npz") as npz:
        x = npz[f"{split}_images"].astype(np.float32) / 255.0
        y = npz[f"{split}_labels"].reshape(-1).astype(np.int64)
    return x[:, None], y


def cifar10(split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 'test1000' (lossless) or 'train9000' (JPEG): (N, 3, 32, 32) in [0, 1]."""
    name, kx, ky = {"test1000": ("cifar10_test1000.npz", "x_test", "y_test"),
                    "train9000": ("cifar10_train9000_jpeg.npz", "x_train", "y_train")}[split]
    with np.load(data_dir() / "cifar10" / name) as npz:
        x = npz[kx].astype(np.float32) / 255.0
        y = npz[ky].reshape(-1).astype(np.int64)
    return x.transpose(0, 3, 1, 2), y
