"""The ``h33`` command line, run as a user would: a real subprocess per step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from h33_bento.compiler.torch_import import export_onnx

H33 = str(Path(sys.executable).parent / "h33")


def h33(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([H33, *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, convnet, mnist_train, mnist_test):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(export_onnx(convnet, (1, 28, 28)), d / "convnet.onnx")
    np.save(d / "calib.npy", mnist_train[0][:128])
    np.save(d / "x.npy", mnist_test[0][:8])
    np.save(d / "y.npy", mnist_test[1][:8])
    return d


def test_compile_inspect_keygen_encrypt_infer_decrypt(workdir, convnet):
    d = workdir
    out = h33("compile", str(d / "convnet.onnx"), "--input-shape", "1,28,28", "--calibration", str(d / "calib.npy"),
              "--out", str(d / "model"), "--labels", ",".join("zero one two three four five six seven eight nine".split()))
    assert "HEStd_128_classic" in out.stdout and (d / "model" / "manifest.json").exists()
    assert "rotation keys" in h33("inspect", str(d / "model")).stdout
    keys = h33("keygen", str(d / "model"), "--keys", str(d / "keys")).stdout
    assert "key_id" in keys and (d / "keys" / "secret.key").exists()
    h33("encrypt", str(d / "model"), "--keys", str(d / "keys"), "--input", str(d / "x.npy"), "--out", str(d / "x.h33"))
    # the server step sees only the evaluation-key bundle
    h33("infer", str(d / "model"), "--eval-keys", str(d / "keys" / "evaluation_keys.h33k"),
        "--input", str(d / "x.h33"), "--out", str(d / "y.h33"))
    text = h33("decrypt", str(d / "model"), "--keys", str(d / "keys"), "--input", str(d / "y.h33")).stdout
    from h33_bento import zoo

    names = "zero one two three four five six seven eight nine".split()
    want = [names[i] for i in zoo.predict_logits(convnet, np.load(d / "x.npy")).argmax(1)]
    got = [line.split()[1] for line in text.splitlines() if line.startswith("[")]
    assert got == want


@pytest.fixture
def model_dir(workdir) -> Path:
    """The ConvNet compiled by the CLI (by the first test, or now when it ran alone)."""
    if not (workdir / "model").exists():
        h33("compile", str(workdir / "convnet.onnx"), "--input-shape", "1,28,28",
            "--calibration", str(workdir / "calib.npy"), "--out", str(workdir / "model"))
    return workdir / "model"


def test_run_reports_accuracy_and_timing(workdir, model_dir):
    out = h33("run", str(model_dir), "--input", str(workdir / "x.npy"), "--labels", str(workdir / "y.npy")).stdout
    assert "ms/input amortized" in out and "accuracy" in out


def test_encrypt_reads_only_the_public_key_and_decrypt_only_the_secret_key(workdir, model_dir, convnet):
    d, keys = workdir, workdir / "split-keys"
    h33("keygen", str(model_dir), "--keys", str(keys))
    bundle = d / "uploaded.h33k"  # the server's copy: the client directory no longer has it
    (keys / "evaluation_keys.h33k").rename(bundle)
    hidden = d / "hidden.key"
    (keys / "secret.key").rename(hidden)  # encrypting must not need it
    h33("encrypt", str(model_dir), "--keys", str(keys), "--input", str(d / "x.npy"), "--out", str(d / "xs.h33"))
    hidden.rename(keys / "secret.key")
    h33("infer", str(model_dir), "--eval-keys", str(bundle), "--input", str(d / "xs.h33"), "--out", str(d / "ys.h33"))
    (keys / "public.key").rename(hidden)  # decrypting must not need it
    split = h33("decrypt", str(model_dir), "--keys", str(keys), "--input", str(d / "ys.h33")).stdout
    hidden.rename(keys / "public.key")
    bundle.rename(keys / "evaluation_keys.h33k")
    full = h33("decrypt", str(model_dir), "--keys", str(keys), "--input", str(d / "ys.h33")).stdout
    from h33_bento import zoo
    from h33_bento.program.model import CompiledModel

    def predictions(text: str) -> list[tuple[str, float]]:
        rows = [line.split()[1:3] for line in text.splitlines() if line.startswith("[")]
        return [(label, float(conf.strip("()"))) for label, conf in rows]

    names = CompiledModel.load(model_dir).class_labels()
    want = [names[i] for i in zoo.predict_logits(convnet, np.load(d / "x.npy")).argmax(1)]
    assert [label for label, _ in predictions(split)] == [label for label, _ in predictions(full)] == want
    # OpenFHE's CKKS decoding adds fresh noise to every decryption: equal up to it
    assert np.allclose([c for _, c in predictions(split)], [c for _, c in predictions(full)], atol=2e-3)


def test_errors_are_clear_and_exit_nonzero(workdir, tmp_path):
    missing = h33("inspect", str(tmp_path / "nope"), ok=False)
    assert missing.returncode == 2 and "is not a compiled h33 model" in missing.stderr
    bad = h33("compile", str(tmp_path / "nope.onnx"), "--input-shape", "1,28,28", "--out", str(tmp_path / "o"), ok=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    (tmp_path / "junk.h33").write_bytes(b"H33T" + b"\x00" * 20)
    if (workdir / "model").exists() and (workdir / "keys").exists():
        junk = h33("infer", str(workdir / "model"), "--eval-keys", str(workdir / "keys" / "evaluation_keys.h33k"),
                   "--input", str(tmp_path / "junk.h33"), "--out", str(tmp_path / "o.h33"), ok=False)
        assert junk.returncode == 2 and "error:" in junk.stderr


@pytest.fixture(scope="module")
def relu_mlp(workdir, mnist_train) -> Path:
    """A small ReLU network as ONNX: the compiler replaces its ReLU by a Chebyshev series."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    onnx.save(export_onnx(model, (1, 28, 28)), workdir / "mlp.onnx")
    with torch.no_grad():  # what calibration observes at the ReLU's input
        pre = model[1](torch.as_tensor(np.load(workdir / "calib.npy"), dtype=torch.float32).flatten(1)).numpy()
    np.save(workdir / "mlp_relu_input_range.npy", [pre.min(), pre.max()])
    return workdir / "mlp.onnx"


def test_compile_degrees_and_margin_shape_the_activation(workdir, relu_mlp):
    from h33_bento.program.model import CompiledModel

    out = workdir / "mlp-d3"
    h33("compile", str(relu_mlp), "--input-shape", "1,28,28", "--calibration", str(workdir / "calib.npy"),
        "--degrees", "relu=3", "--margin", "0.5", "--out", str(out))
    (poly,) = [s for s in CompiledModel.load(out).steps if s.op.value == "poly"]
    lo, hi = np.load(workdir / "mlp_relu_input_range.npy")
    assert len(poly.attrs["coeffs"]) == 4  # degree 3, not the default 15
    span = hi - lo
    assert np.allclose([poly.attrs["lower"], poly.attrs["upper"]], [lo - 0.5 * span, hi + 0.5 * span], rtol=1e-4)


def test_compile_plan_only_prints_estimates_and_writes_nothing(workdir, relu_mlp, tmp_path):
    res = h33("compile", str(relu_mlp), "--input-shape", "1,28,28", "--calibration", str(workdir / "calib.npy"),
              "--degrees", "relu=7", "--plan-only")
    assert "planned in" in res.stdout and "deg 7 on" in res.stdout
    # nothing measured: keys from the parameters, latency from the stored table, and the report says so
    bundle = res.stdout.split("key bundle: ")[1]
    assert float(bundle.split()[0]) > 0 and "latency None" not in bundle
    assert "estimated from the parameters" in bundle and "from the stored cost table" in bundle
    both = h33("compile", str(relu_mlp), "--input-shape", "1,28,28", "--calibration", str(workdir / "calib.npy"),
               "--plan-only", "--out", str(tmp_path / "m"), ok=False)
    assert both.returncode == 2 and "--out" in both.stderr and not (tmp_path / "m").exists()


@pytest.mark.parametrize("bad, why", [("relu:7", "expected activation=degree"), ("relu=seven", "expected"),
                                      ("swish=3", "unknown activation"), ("relu=0", "at least 1")])
def test_compile_refuses_bad_degrees(workdir, relu_mlp, bad, why):
    res = h33("compile", str(relu_mlp), "--input-shape", "1,28,28", "--calibration", str(workdir / "calib.npy"),
              "--degrees", bad, "--plan-only", ok=False)
    assert res.returncode == 2 and "--degrees" in res.stderr and why in " ".join(res.stderr.split())


def test_compile_reuses_this_machines_costs_unless_told_to_remeasure(workdir, relu_mlp, tmp_path):
    args = ("compile", str(relu_mlp), "--input-shape", "1,28,28", "--calibration", str(workdir / "calib.npy"))
    fresh = h33(*args, "--out", str(tmp_path / "a"), "--remeasure-costs")
    assert "cost cache" not in fresh.stdout and "predicted latency" in fresh.stdout
    again = h33(*args, "--out", str(tmp_path / "b"))
    assert "from this machine's cost cache" in again.stdout
