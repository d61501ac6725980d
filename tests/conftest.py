"""Shared fixtures: real MNIST data, trained networks, compiled programs and key chains.

Everything is session-scoped: training and key generation happen once per test run.
"""
from __future__ import annotations

import os

# OpenFHE parallelizes with OpenMP; with busy-waiting threads, two processes sharing two cores
# (pytest's client and a `bentoml serve` worker) slow each other down tenfold. Passive waiting
# keeps both threads useful. Set before openfhe is first imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

from h33_bento import compile, datasets, zoo  # noqa: E402
from h33_bento.client import FHEInferenceClient  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _measurement_cache(tmp_path_factory):
    """Measured primitive and bootstrap costs are cached per machine (``ckks.timing.cache_path``):
    the suite keeps its own cache, never the user's, so runs neither read nor leave any."""
    os.environ["H33_CACHE_DIR"] = str(tmp_path_factory.mktemp("h33-cache"))


@pytest.fixture(autouse=True)
def _seeded():
    """Initial weights are drawn when a model is built, before ``zoo.train`` seeds: seed torch per test
    so its networks do not depend on which tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_train():
    return datasets.mnist_train5k()


@pytest.fixture(scope="session")
def mnist_test():
    return datasets.mnist_test()


@pytest.fixture(scope="session")
def cnn(mnist_train):
    """Conv + BN + x^2 + AvgPool + dense, trained on 5k real MNIST images."""
    x, y = mnist_train
    torch.manual_seed(0)
    return zoo.train(zoo.MnistCNN(), x, y, epochs=4)


@pytest.fixture(scope="session")
def cnn_compiled(cnn, mnist_train):
    return compile(cnn, (1, 28, 28), calibration_data=mnist_train[0][:256], labels=[str(i) for i in range(10)])


@pytest.fixture(scope="session")
def cnn_client(cnn_compiled):
    return FHEInferenceClient(cnn_compiled)


@pytest.fixture(scope="session")
def convnet(mnist_train):
    x, y = mnist_train
    torch.manual_seed(0)
    return zoo.train(zoo.ConvNet(), x, y, epochs=2)


@pytest.fixture(scope="session")
def convnet_compiled(convnet, mnist_train):
    return compile(convnet, (1, 28, 28), calibration_data=mnist_train[0][:128])


@pytest.fixture(scope="session")
def convnet_client(convnet_compiled):
    return FHEInferenceClient(convnet_compiled)


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-2) -> None:
    """Max |error| at most ``rel`` times the range of the reference logits."""
    span = float(want.max() - want.min())
    err = float(np.abs(got - want).max())
    assert err <= rel * span, f"max logit error {err:.3g} exceeds {rel} x logit range {span:.3g}"


def held_bytes(obj, seen=None) -> list[bytes]:
    """Every bytes object and numpy array's bytes reachable from ``obj``'s attributes (containers included)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray)):
        return [bytes(obj)]
    if isinstance(obj, np.ndarray):
        return [obj.tobytes()]
    if isinstance(obj, dict):
        return [b for v in list(obj.keys()) + list(obj.values()) for b in held_bytes(v, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [b for v in obj for b in held_bytes(v, seen)]
    if hasattr(obj, "__dict__"):
        return held_bytes(vars(obj), seen)
    return []
