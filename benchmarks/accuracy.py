"""Accuracy of FHE-friendly models on real data: ReLU original, polynomial model in plaintext, the
compiled program (``simulate``) on the full test set, and real encrypted inference (OpenFHE).

    python benchmarks/accuracy.py                          # all three datasets, print the table
    python benchmarks/accuracy.py --write docs/accuracy.md  # ... and write the report

Per dataset: train the ReLU network (``h33_bento.zoo``, fixed seed), ``polyfy`` it (PolyReLU with
trainable coefficients, MaxPool -> AvgPool) with ranges calibrated on training images, ``finetune``
it (range penalty, distillation from the ReLU model, BatchNorm statistics frozen, same data and
augmentation as the ReLU model), ``compile`` it, ``simulate`` the compiled program on the whole test
set, then run the first N test images encrypted (8 per ciphertext) through ``FHEInferenceClient``.
An extra plaintext experiment on MNIST measures what inputs outside the calibrated ranges do to
accuracy.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h33_bento import compile, simulate, zoo  # noqa: E402
from h33_bento import nn as hnn  # noqa: E402
from h33_bento.client import FHEInferenceClient  # noqa: E402
from h33_bento.compiler.calibration import RangeWarning  # noqa: E402
from h33_bento.program.polynomials import chebyshev_depth  # noqa: E402


@dataclass
class Config:
    """One dataset's recipe.  The ReLU model and its polynomial version get the same training data,
    the same augmentation and the same learning-rate schedule; the epochs are kept on validation
    data where ``val`` is set."""

    name: str
    label: str
    ctor: type
    dataset: str  # zoo recipe dataset
    train_desc: str
    test_desc: str
    epochs: int
    finetune_epochs: int
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    #: learning rate of the trainable polynomial coefficients
    coeff_lr: float = 1e-2
    #: weight of ``finetune``'s range penalty (``nn.range_penalty``)
    penalty: float = 10.0
    #: PolyReLU degree (4 and 5 cost 4 levels, 6 to 13 cost 5)
    degree: int = 4
    lr_schedule: str = "constant"
    #: random crops and mirroring (``zoo.random_crop_flip``) for both models
    augment: bool = False
    encrypted: int = 256
    #: select the training / fine-tuning epoch on a validation set: the dataset's own split
    #: ("official") or the last 1,000 of a seeded shuffle of the training images ("holdout")
    val: str | None = None
    #: calibrate each activation with the ones before it polynomial (``polyfy(sequential=True)``):
    #: ResNet-20's degree-2 activations shift the next layers' inputs out of exact-network ranges
    sequential: bool = False


CONFIGS = {
    "mnist": Config("mnist", "MNIST", zoo.MnistNet, "mnist", "5,000 training images (500/class)",
                    "official 10,000 test images", epochs=10, finetune_epochs=5),
    "pneumonia": Config("pneumonia", "PneumoniaMNIST", zoo.PneumoniaCNN, "pneumonia", "train split (3,882)",
                        "official test split (624)", epochs=10, finetune_epochs=10, encrypted=624, val="official"),
    "cifar10": Config("cifar10", "CIFAR-10", zoo.CifarCNN, "cifar10",
                      "the 9,000-image JPEG subset (8,000 to train, 1,000 held out to pick epochs)",
                      "1,000 lossless test images (disjoint)", epochs=120, finetune_epochs=40, lr=4e-3,
                      finetune_lr=2e-3, degree=13, lr_schedule="cosine", augment=True, val="holdout"),
    # the deep-network benchmark's model (benchmarks/deep.py): degree 2 keeps bootstraps few; fine-tuning
    # at lr 2e-3 diverges, and a 10x range penalty keeps more inputs in range (docs/benchmarks.md)
    "resnet20": Config("resnet20", "CIFAR-10 (ResNet-20)", zoo.ResNet20, "cifar10",
                       "the 9,000-image JPEG subset (8,000 to train, 1,000 held out to pick epochs)",
                       "1,000 lossless test images (disjoint)", epochs=30, finetune_epochs=8, lr=4e-3,
                       finetune_lr=5e-4, coeff_lr=1e-3, penalty=100.0, degree=2, lr_schedule="cosine",
                       augment=True, val="holdout", encrypted=0, sequential=True),
}


def _kept_epoch(history: list[dict], epochs: int) -> tuple[int, float | None]:
    """The epoch (from 1) ``train``/``finetune`` kept, the first best on validation, and its
    validation top-1; without validation data the last epoch and None."""
    scores = [h["val_accuracy"] for h in history if "val_accuracy" in h]
    if not scores:
        return epochs, None
    best = int(np.argmax(scores))
    return best + 1, scores[best]


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def _quiet_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        return zoo.predict_logits(model, x)


#: --write replaces the report above this line of the file and keeps everything from it on (sections
#: measured by other benchmarks).
KEEP_MARKER = "<!-- sections below come from other benchmarks; benchmarks/accuracy.py --write keeps them -->"


def run_dataset(cfg: Config, args: argparse.Namespace) -> dict:
    t_all = time.perf_counter()
    x_tr, y_tr = zoo._data(cfg.dataset, "train")
    x_te, y_te = zoo._data(cfg.dataset, "test")
    r: dict = {"dataset": cfg.label, "model": cfg.ctor.__name__, "train": cfg.train_desc, "test": cfg.test_desc,
               "n_test": int(len(x_te)), "val": cfg.val,
               "recipe": {k: getattr(cfg, k) for k in ("epochs", "lr", "finetune_epochs", "finetune_lr", "coeff_lr",
                                                       "penalty", "lr_schedule", "augment")}}
    val = None
    if cfg.val == "official":
        val = zoo._data(cfg.dataset, "val")
    elif cfg.val == "holdout":
        order = np.random.default_rng(args.seed).permutation(len(x_tr))
        val = (x_tr[order[-1000:]], y_tr[order[-1000:]])
        x_tr, y_tr = x_tr[order[:-1000]], y_tr[order[:-1000]]
    epochs = 1 if args.quick else (args.epochs or cfg.epochs)
    augment = zoo.random_crop_flip if cfg.augment else None
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    r["recipe"]["epochs"] = epochs
    relu_history: list[dict] = []
    trained = Path(args.relu_weights) / f"{cfg.name}-relu.pt" if args.relu_weights else None
    if trained is not None:  # a ReLU model an earlier run saved: only the polynomial part runs again
        relu = cfg.ctor()
        relu.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True))
        relu.eval()
        r["relu_epoch"], r["relu_val_acc"] = None, None
    else:
        relu = zoo.train(cfg.ctor(), x_tr, y_tr, epochs=epochs, lr=cfg.lr, seed=args.seed,
                         lr_schedule=cfg.lr_schedule, augment=augment, validation=val, history=relu_history)
        r["relu_epoch"], r["relu_val_acc"] = _kept_epoch(relu_history, epochs)
    if args.save:  # at once: fine-tuning, compiling or a deep network's run may not finish
        Path(args.save).mkdir(parents=True, exist_ok=True)
        torch.save(relu.state_dict(), Path(args.save) / f"{cfg.name}-relu.pt")
    r["n_train"], r["n_val"] = len(x_tr), (len(val[0]) if val is not None else 0)
    r["train_s"] = time.perf_counter() - t0
    r["relu_acc"] = _acc(zoo.predict_logits(relu, x_te), y_te)
    how = f"loaded from {trained}" if trained is not None else \
        f"{epochs} epochs, kept epoch {r['relu_epoch']}, {r['train_s']:.0f} s"
    print(f"[{cfg.name}] ReLU model ({how}): "
          f"top-1 {r['relu_acc']:.4f}", flush=True)

    poly = copy.deepcopy(relu)
    calib = x_tr[np.random.default_rng(args.seed).permutation(len(x_tr))[:2000]]
    r["degree"] = args.degree or cfg.degree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        replaced = hnn.polyfy(poly, calib, margin=args.margin, degrees={"relu": r["degree"]}, trainable=True,
                               sequential=cfg.sequential)
    r["replaced"] = [f"{p.path}: {p.original} -> {p.replacement}" for p in replaced]
    r["poly_acc_before_finetune"] = _acc(_quiet_logits(poly, x_te), y_te)
    t0 = time.perf_counter()
    history: list[dict] = []
    ft_epochs = r["recipe"]["finetune_epochs"] = 1 if args.quick else (args.finetune_epochs or cfg.finetune_epochs)
    ft_lr = r["recipe"]["finetune_lr"] = args.finetune_lr or cfg.finetune_lr
    c_lr = r["recipe"]["coeff_lr"] = args.coeff_lr or cfg.coeff_lr
    weight = r["recipe"]["penalty"] = args.penalty or cfg.penalty
    hnn.finetune(poly, (x_tr, y_tr), epochs=ft_epochs, lr=ft_lr, coeff_lr=c_lr, penalty=weight, seed=args.seed,
                 teacher=relu, lr_schedule=cfg.lr_schedule, augment=augment, freeze_bn=True, validation=val,
                 history=history)
    r["finetune_epoch"], r["poly_val_acc"] = _kept_epoch(history, ft_epochs)
    r["finetune_s"] = time.perf_counter() - t0
    r["finetune_history"] = history
    poly_logits = _quiet_logits(poly, x_te)
    r["poly_acc"] = _acc(poly_logits, y_te)
    r["test_out_of_range"] = hnn.out_of_range(poly, x_te).share
    r["ranges"] = {name: [m.lower, m.upper, m.degree] for name, m in hnn.poly_modules(poly)}
    print(f"[{cfg.name}] polynomial model: top-1 {r['poly_acc_before_finetune']:.4f} after polyfy, "
          f"{r['poly_acc']:.4f} after fine-tuning ({r['finetune_s']:.0f} s); test inputs out of range: "
          f"{r['test_out_of_range']:.2%}", flush=True)
    if args.save:  # before compiling: a deep network's compile or run may not finish
        torch.save(poly.state_dict(), Path(args.save) / f"{cfg.name}-poly.pt")

    t0 = time.perf_counter()
    # (calibration data only checks bootstrap input ranges: trained polynomials are kept as they are)
    compiled = compile(poly, x_te.shape[1:], calibration_data=calib, measure_costs=False)
    r["compile_s"] = time.perf_counter() - t0
    r["ring_dim"], r["depth"] = compiled.params.ring_dim, compiled.depth
    r["rotation_keys"] = len(compiled.params.rotation_indices)
    coeffs_equal = all(
        np.array_equal(s.attrs["coeffs"], m.numpy_coeffs()) and (s.attrs["lower"], s.attrs["upper"]) == (m.lower, m.upper)
        for s, (_, m) in zip([s for s in compiled.steps if s.op == "poly"], hnn.poly_modules(poly)))
    r["compiled_polynomials_equal_trained"] = bool(coeffs_equal)
    t0 = time.perf_counter()
    sim = simulate(compiled, x_te)
    r["simulate_s"] = time.perf_counter() - t0
    r["sim_acc"] = _acc(sim, y_te)
    r["sim_agrees_poly"] = float((sim.argmax(1) == poly_logits.argmax(1)).mean())
    r["sim_max_err"] = float(np.abs(sim - poly_logits).max())
    print(f"[{cfg.name}] compiled (N=2^{int(np.log2(compiled.params.ring_dim))}, depth {compiled.depth}, "
          f"{r['compile_s']:.0f} s): simulate top-1 {r['sim_acc']:.4f} on {len(x_te)}, argmax = torch on "
          f"{r['sim_agrees_poly']:.2%}", flush=True)

    n_enc = min(len(x_te), cfg.encrypted, args.encrypted if cfg.name != "pneumonia" else args.encrypted_pneumonia)
    if args.quick:
        n_enc = min(n_enc, 16)
    r["n_encrypted"] = n_enc
    if n_enc:
        t0 = time.perf_counter()
        client = FHEInferenceClient(compiled)
        r["keygen_s"] = time.perf_counter() - t0
        r["key_bundle_mib"] = client.keys.evaluation_keys().size_bytes / 2**20
        lanes = client.lanes
        outs, server, enc_s, dec_s = [], [], 0.0, 0.0
        t_enc0 = time.perf_counter()
        for i in range(0, n_enc, lanes):
            t0 = time.perf_counter()
            ct = client.encrypt(x_te[i:i + lanes])
            t1 = time.perf_counter()
            out = client.infer(ct)
            t2 = time.perf_counter()
            outs.append(client.decrypt_logits(out))
            t3 = time.perf_counter()
            enc_s += t1 - t0
            server.append(t2 - t1)
            dec_s += t3 - t2
            if (i // lanes) % 8 == 0:
                print(f"[{cfg.name}]   encrypted {i + len(outs[-1])}/{n_enc}: last pass {server[-1]:.2f} s", flush=True)
        r["encrypted_wall_s"] = time.perf_counter() - t_enc0
        got = np.concatenate(outs)
        ref = sim[:n_enc]
        r["enc_acc"] = _acc(got, y_te[:n_enc])
        r["enc_agrees_sim"] = float((got.argmax(1) == ref.argmax(1)).mean())
        r["enc_disagreements"] = int((got.argmax(1) != ref.argmax(1)).sum())
        r["enc_max_err"] = float(np.abs(got - ref).max())
        r["enc_rel_err"] = r["enc_max_err"] / float(ref.max() - ref.min())
        r["sim_acc_same_images"] = _acc(ref, y_te[:n_enc])
        r["server_s_per_pass_first"] = server[0]
        r["server_s_per_pass_median"] = float(np.median(server[1:] if len(server) > 1 else server))
        r["server_ms_per_image"] = 1000 * float(np.sum(server)) / n_enc
        r["roundtrip_ms_per_image"] = 1000 * (enc_s + float(np.sum(server)) + dec_s) / n_enc
        print(f"[{cfg.name}] encrypted {n_enc}: top-1 {r['enc_acc']:.4f} (simulate on the same images "
              f"{r['sim_acc_same_images']:.4f}), argmax = simulate {r['enc_agrees_sim']:.2%}, max |err| "
              f"{r['enc_max_err']:.2e}, server {r['server_ms_per_image']:.0f} ms/image "
              f"(median pass {r['server_s_per_pass_median']:.2f} s)", flush=True)
        del client
        gc.collect()

    if cfg.name == "mnist" and not args.quick:
        r["out_of_range_experiment"] = out_of_range_experiment(relu, poly, x_te, y_te)
    r["total_s"] = time.perf_counter() - t_all
    return r


def out_of_range_experiment(relu: torch.nn.Module, poly: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Scale the test images' contrast so activations leave their calibrated ranges."""
    rows = []
    for gain in (1.0, 1.25, 1.5, 2.0, 3.0):
        xs = (x * gain).astype(np.float32)
        rows.append({
            "gain": gain,
            "relu_acc": _acc(zoo.predict_logits(relu, xs), y),
            "poly_acc": _acc(_quiet_logits(poly, xs), y),
            "out_of_range": hnn.out_of_range(poly, xs).share,
        })
        print(f"[mnist] contrast x{gain}: ReLU {rows[-1]['relu_acc']:.4f}, poly {rows[-1]['poly_acc']:.4f}, "
              f"images with an activation out of range {rows[-1]['out_of_range']:.2%}", flush=True)
    return rows


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _lr(v: float) -> str:
    """A learning rate as written in the code: 2e-3."""
    return f"{v:.0e}".replace("e-0", "e-")


def render(results: list[dict], args: argparse.Namespace, command: str, total_s: float) -> str:
    L = [
        "# Accuracy of encrypted models on real data",
        "",
        "Measured, not promised: every number below comes from one run of the command below on this",
        f"machine ({platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch threads = {args.threads},"
        f" OpenFHE 1.6.1), {total_s / 60:.0f} minutes in all.",
        "",
        "```",
        command,
        "```",
        "",
        "Accuracies are printed here in percent; the API reports them as fractions in [0, 1] (`val_accuracy` in",
        "`zoo.train` / `nn.finetune` histories, `mlflow.h33.log_model(accuracy=...)`, `h33 run`).",
        "",
        "What each column is:",
        "",
        "* **ReLU**: the original network (`h33_bento.zoo`, ReLU activations), trained by `zoo.train` (Adam,",
        f"  cross-entropy, seed {args.seed}) with the recipe of the next table.",
        "* **poly**: the same network after `h33_bento.nn.polyfy(..., trainable=True)` (ReLU -> `PolyReLU`, a",
        "  Chebyshev series started as the fit of a smooth ReLU, whose coefficients are then trained; ranges",
        f"  calibrated on 2,000 training images with a {args.margin:.0%} margin, then fixed) and `finetune` (range",
        "  penalty; distillation from the ReLU model, weight 0.5 at temperature 2; BatchNorm statistics frozen;",
        "  the same training images, augmentation and learning-rate schedule as the ReLU model), in plaintext torch.",
        "* **compiled**: the CKKS program from `h33_bento.compile`, run by `simulate` (same layouts, diagonals",
        "  and polynomials as the encrypted engine, without the noise) on the **whole** test set.",
        "* **encrypted**: real OpenFHE inference through `FHEInferenceClient` (keygen, encrypt 8 images per",
        "  ciphertext, server-side engine with evaluation keys only, decrypt) on the first *n* test images;",
        "  accuracy on those images, and how often its argmax equals `simulate`'s on the same images.",
        "",
        "| dataset | model | test set | ReLU top-1 (%) | poly top-1 (%) | poly - ReLU (points) | compiled (simulate) top-1 (%) | encrypted top-1 (%) (n) | encrypted argmax = simulate (%) | max logit error | CKKS | server time per image |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        enc = (f"{_pct(r['enc_acc'])} ({r['n_encrypted']})" if r.get("n_encrypted") else "not run")
        agree = (f"{_pct(r['enc_agrees_sim'])} ({r['enc_disagreements']} differ)" if r.get("n_encrypted") else "-")
        err = f"{r['enc_max_err']:.1e}" if r.get("n_encrypted") else "-"
        t = f"{r['server_ms_per_image']:.0f} ms" if r.get("n_encrypted") else "-"
        L.append(
            f"| {r['dataset']} | {r['model']} | {r['n_test']} | {_pct(r['relu_acc'])} | {_pct(r['poly_acc'])} | "
            f"{100 * (r['poly_acc'] - r['relu_acc']):+.2f} | {_pct(r['sim_acc'])} | {enc} | {agree} | {err} | "
            f"N=2^{int(np.log2(r['ring_dim']))}, depth {r['depth']} | {t} |"
        )
    L += [
        "",
        "Recipes (`CONFIGS` in `benchmarks/accuracy.py`; Adam, batches of 64). Where there is validation data,",
        "both models keep the epoch that scores best on it, never on the test set: the accuracy of these small",
        "models swings by one to several points from one epoch to the next.",
        "",
        "| dataset | ReLU training | poly fine-tuning | PolyReLU degree (levels) | augmentation | epochs kept on |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c = r["recipe"]
        kept = (f"validation, {r['n_val']:,} images (ReLU epoch {r['relu_epoch']}, fine-tuning epoch "
                f"{r['finetune_epoch']})" if r.get("val") else "none: the last epoch")
        L.append(
            f"| {r['dataset']} | {c['epochs']} epochs, lr {_lr(c['lr'])} {c['lr_schedule']} | {c['finetune_epochs']} "
            f"epochs, lr {_lr(c['finetune_lr'])} (coefficients {_lr(c['coeff_lr'])}) {c['lr_schedule']} | {r['degree']} "
            f"({chebyshev_depth(r['degree'])}) | {'random crops (4-pixel padding), mirroring' if c['augment'] else 'none'} "
            f"| {kept} |"
        )
    cifar = CONFIGS["cifar10"]
    L += [
        "",
        "The CIFAR-10 models are made like this (what `run_dataset` does):",
        "",
        "```python",
        "from h33_bento import compile, nn as hnn, zoo",
        f"relu = zoo.train(zoo.CifarCNN(), x_train, y_train, epochs={cifar.epochs}, lr={_lr(cifar.lr)}, "
        f"lr_schedule={cifar.lr_schedule!r},",
        "                 augment=zoo.random_crop_flip, validation=(x_val, y_val))          # ReLU original",
        "model = copy.deepcopy(relu)",
        f"hnn.polyfy(model, x_train[:2000], margin={args.margin}, degrees={{'relu': {cifar.degree}}}, trainable=True)",
        f"hnn.finetune(model, (x_train, y_train), epochs={cifar.finetune_epochs}, lr={_lr(cifar.finetune_lr)}, "
        f"coeff_lr={_lr(cifar.coeff_lr)}, lr_schedule={cifar.lr_schedule!r},",
        "             augment=zoo.random_crop_flip, teacher=relu, freeze_bn=True, validation=(x_val, y_val))",
        "compiled = compile(model, (3, 32, 32))      # ChebyshevPoly nodes compiled as trained",
        "```",
    ]
    L += ["", "## Targets", ""]
    for r in results:
        diff = 100 * (r["poly_acc"] - r["relu_acc"])
        ok1 = diff >= -1.0
        line = (f"* {r['dataset']}: poly within 1 point of ReLU top-1: **{'met' if ok1 else 'NOT met'}** "
                f"({diff:+.2f} points")
        if r.get("relu_val_acc") is not None:
            line += (f"; on the validation images {100 * (r['poly_val_acc'] - r['relu_val_acc']):+.2f}, "
                     f"{_pct(r['poly_val_acc'])} vs {_pct(r['relu_val_acc'])}")
        line += ")"
        if r.get("n_encrypted"):
            ok2 = r["enc_agrees_sim"] >= 0.999
            line += (f"; encrypted argmax = simulate on >= 99.9%: **{'met' if ok2 else 'NOT met'}** "
                     f"({_pct(r['enc_agrees_sim'])}% of {r['n_encrypted']})")
        L.append(line + ".")
    L += [
        "",
        "The test sets are small: 1,000 CIFAR-10 images give a standard error of about 1.5 points on each",
        "model's accuracy (less on the difference of two models that agree on most images, but not nothing).",
        "",
        "On PneumoniaMNIST the test split is unlike the training and validation splits (both models score far",
        "higher on validation than on test, see the details), and its test accuracy swings by several points",
        'from one epoch to the next, so a large "poly - ReLU" there, either way, is mostly that swing; the',
        "validation gap in the Targets is the steadier measure. (The previous report's PneumoniaMNIST ReLU",
        "top-1 of 85.26 had its epoch picked on the test split: see the bug fixed below.)",
        "",
        "## CIFAR-10: what changed, what was tried (development notes)",
        "",
        "The previous version of this report had CIFAR-10 at ReLU 55.90, poly 52.30 (-3.60): the ReLU model",
        "trained 15 epochs at a constant lr 2e-3 without augmentation, degree-4 PolyReLU with fixed",
        "coefficients, 30 epochs of fine-tuning with distillation. What changed it, measured during",
        "development in plaintext (1 torch thread, the benchmark's split for seeds 0 to 2; **validation** top-1",
        "on the 1,000 held-out images at the best epoch, never the test set; these numbers do not come from the",
        "command above):",
        "",
        "* The ReLU baseline was under-trained. With random crops and mirroring and a cosine schedule it",
        "  reached 58.8 (40 epochs, lr 2e-3), 62.9 (40, lr 4e-3), 64.7 (80), 66.5 (120), 65.6 (200) and 66.6",
        "  (300 epochs, lr 4e-3); lr 8e-3 or weight decay 1e-4 did not help. 120 epochs at lr 4e-3 is where it",
        "  stops improving, so that is the ReLU model now (about 10 points above the old one), and training it",
        "  longer would not change the comparison. The polynomial model gets the same images, augmentation",
        "  and schedule, starts from the trained ReLU weights and learns from them by distillation.",
        "* Trainable coefficients (`polyfy(..., trainable=True)`) and frozen BatchNorm statistics while",
        "  fine-tuning (`freeze_bn=True`) were enough against a weak baseline (40-epoch ReLU 58.8, poly 59.6),",
        "  not against the 120-epoch one: at degree 4 the polynomial model stayed 3.5 to 4.5 points below it",
        "  (62.0 to 63.0 vs 66.5) whatever we tried: fixed or trained coefficients, 40 or 60 epochs,",
        "  distillation weight 1.0 at temperature 4, matching logits (MSE) instead of KL, coefficients",
        "  initialised by a least-squares fit of ReLU on the observed activation inputs. Degree 5 (same 4",
        "  levels) gave 63.5, degree 7 (5 levels) 63.6.",
        "* Degree 13, the largest degree at 5 levels, brought it to parity: the network is 13 levels deep instead of 11,",
        "  still N=2^16 without bootstrapping. Validation gaps (poly - ReLU) for seeds 0, 1, 2: +0.4, +1.4,",
        "  -0.6 (development script) and -1.6, -0.6, +0.7 (this benchmark's code, whose augmentation draws",
        "  other random numbers): parity within the noise of 1,000 images, not a margin.",
        "* Did not help at degree 13 (changes within the epoch-to-epoch noise; the mean over the last 10",
        "  epochs stayed put): 60 instead of 40 fine-tuning epochs, coefficient lr 2e-3 or 3e-2 instead of",
        "  1e-2, fine-tuning lr 1e-3 or 4e-3 instead of 2e-3, distillation weight 0.2 or 0.8, a 5% margin,",
        "  ranges narrowed to 75% of the calibrated ones. Worse: ranges narrowed to 50% and degree 27",
        "  (6 levels) diverged while fine-tuning; the least-squares initialisation collapsed on one seed.",
        "",
        "The same fine-tuning recipe (trainable coefficients, frozen BatchNorm) is used on MNIST and",
        "PneumoniaMNIST, with their degree 4 and their previous epochs and learning rates. A bug fixed with",
        "this version: `zoo._data('pneumonia', 'val')` returned the test split, so the PneumoniaMNIST epochs of",
        "the previous report were picked on the test set; they are picked on the official validation split now.",
    ]
    L += ["", "## Details per dataset", ""]
    for r in results:
        L += [
            f"### {r['dataset']}",
            "",
            f"* Data: train on {r['train']}; test on the {r['test']}.",
            f"* Model: `zoo.{r['model']}`; polyfy replaced {len(r['replaced'])} modules: "
            + "; ".join(f"`{s}`" for s in r["replaced"]) + ".",
            "* Calibrated ranges (lower, upper, degree): "
            + ", ".join(f"`{k}` [{v[0]:.3g}, {v[1]:.3g}] deg {v[2]}" for k, v in r["ranges"].items()) + ".",
            f"* ReLU training {r['train_s']:.0f} s, fine-tuning {r['finetune_s']:.0f} s"
            + (f"; validation top-1 at the kept epochs: ReLU {_pct(r['relu_val_acc'])} (epoch {r['relu_epoch']}), "
               f"poly {_pct(r['poly_val_acc'])} (fine-tuning epoch {r['finetune_epoch']})" if r.get("val") else "")
            + ".",
            f"* Poly top-1 right after polyfy (before fine-tuning): {_pct(r['poly_acc_before_finetune'])}; after "
            f"{len(r['finetune_history'])} fine-tuning epochs: {_pct(r['poly_acc'])} "
            f"(range penalty in the last epoch {r['finetune_history'][-1]['penalty']:.2e}).",
            f"* Test images with some activation input outside its range: {r['test_out_of_range']:.2%}.",
            f"* Compiled: N={r['ring_dim']}, {r['depth']} levels, {r['rotation_keys']} rotation keys; compiled "
            f"polynomials equal the trained ones: {r['compiled_polynomials_equal_trained']}; simulate argmax = torch "
            f"poly argmax on {_pct(r['sim_agrees_poly'])}% of the test set (max logit difference "
            f"{r['sim_max_err']:.1e}).",
        ]
        if r.get("n_encrypted"):
            L += [
                f"* Encrypted: {r['n_encrypted']} images in {-(-r['n_encrypted'] // 8)} ciphertexts; keygen "
                f"{r['keygen_s']:.0f} s (evaluation keys {r['key_bundle_mib']:.0f} MiB); server time per ciphertext "
                f"{r['server_s_per_pass_median']:.2f} s median (first pass {r['server_s_per_pass_first']:.2f} s, "
                f"which also encodes the plaintext diagonals) -> {r['server_ms_per_image']:.0f} ms per image on the "
                f"server, {r['roundtrip_ms_per_image']:.0f} ms per image with encryption and decryption; "
                f"{r['encrypted_wall_s'] / 60:.1f} min in all.",
                f"* Encrypted top-1 on those images {_pct(r['enc_acc'])} vs simulate {_pct(r['sim_acc_same_images'])};"
                f" max |encrypted - simulate| logit {r['enc_max_err']:.2e} ({r['enc_rel_err']:.1e} of the logit range).",
            ]
        L.append("")
    mnist = next((r for r in results if r.get("out_of_range_experiment")), None)
    L += [
        "## Outside the calibrated range",
        "",
        "A polynomial matches its activation only on its calibrated range [lower, upper]; outside it the",
        "series grows like t^degree (t the input mapped to [-1, 1]): just past the edge it is still close,",
        "far past it arbitrarily wrong, and the error propagates to every later layer. The modules",
        "warn (`h33_bento.nn.RangeWarning`, the compiler's `RangeWarning`) whenever an input in eval mode",
        "leaves a range; `check_ranges(model, data)` lists the offenders; `compile` warns when its calibration",
        "data leave a trained polynomial's range. Nothing can warn under encryption (the server never sees",
        "values): ranges must be calibrated on data like what will be encrypted, with a margin.",
        "",
    ]
    if mnist:
        L += [
            "Measured on MNIST: the test images' contrast multiplied by a gain (pixels then exceed the [0, 1]",
            "the model was trained and calibrated on), plaintext torch, full 10k test set:",
            "",
            "| contrast gain | ReLU top-1 (%) | poly top-1 (%) | images with an activation out of range |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for row in mnist["out_of_range_experiment"]:
            L.append(f"| x{row['gain']:g} | {_pct(row['relu_acc'])} | {_pct(row['poly_acc'])} | {row['out_of_range']:.2%} |")
        L += [
            "",
            "Inputs slightly out of range cost little (the series diverges only well past the edge); once inputs",
            "land far outside, the polynomial network collapses while the ReLU network degrades gracefully.",
            "Fine-tuning with the range penalty (`finetune(..., penalty=...)`) keeps the training data inside; the",
            "margin (`calibrate_ranges(..., margin=...)`, 10% of the span on each side by default) absorbs small",
            "shifts; data unlike the calibration data need recalibration (and fine-tuning) first. `finetune` counts",
            "the training and validation inputs that still leave a range (`nn.out_of_range`; the last history",
            "record's `out_of_range` and `val_out_of_range`) and warns when either share is above 1%",
            "(`nn.RANGE_BOUND`); `simulate` warns (`RangeWarning`) on the inputs it is given.",
            "",
            "With this version's recipe (trained coefficients, frozen BatchNorm statistics) the MNIST polynomial",
            'model tolerates less contrast than with the previous one (fixed coefficients fitted to a smooth ReLU:',
            'x2 gave 86.10 and x1.25 put 31% of the images out of range in the previous report, numbers not from',
            'the command above): fine-tuning shapes the polynomials on the inputs inside their ranges and nothing',
            'constrains them outside.',
            "",
        ]
    return "\n".join(L)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=[n for n in CONFIGS if n != "resnet20"], choices=list(CONFIGS),
                        help="the ResNet-20 recipe is run on its own (hours): --datasets resnet20")
    parser.add_argument("--save", metavar="DIR", help="save each dataset's ReLU and polynomial state_dicts there")
    parser.add_argument("--relu-weights", metavar="DIR", help="load each dataset's ReLU model from DIR "
                        "(<dataset>-relu.pt, as --save writes it) instead of training it")
    parser.add_argument("--encrypted", type=int, default=256, help="encrypted test images for MNIST and CIFAR-10")
    parser.add_argument("--encrypted-pneumonia", type=int, default=624, help="encrypted PneumoniaMNIST test images")
    parser.add_argument("--degree", type=int, help="PolyReLU degree for every dataset (default: each dataset's)")
    parser.add_argument("--epochs", type=int, help="ReLU training epochs for every dataset (default: each recipe's)")
    parser.add_argument("--finetune-epochs", type=int, help="polynomial fine-tuning epochs (default: each recipe's)")
    parser.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default: each recipe's)")
    parser.add_argument("--coeff-lr", type=float, help="polynomial coefficients' learning rate (default: each recipe's)")
    parser.add_argument("--penalty", type=float, help="weight of the fine-tuning range penalty (default: each "
                        "recipe's)")
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 16 encrypted images (smoke test)")
    parser.add_argument("--write", metavar="PATH", help="write the markdown report (e.g. docs/accuracy.md)")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run_dataset(CONFIGS[name], args) for name in args.datasets]
    total = time.perf_counter() - t0
    argv = [a for a in sys.argv[1:]]
    command = "python benchmarks/accuracy.py" + (" " + " ".join(argv) if argv else "")
    text = render(results, args, command, total)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write:
        out = Path(args.write)
        old = out.read_text() if out.exists() else ""
        kept = old[old.index(KEEP_MARKER):] if KEEP_MARKER in old else ""
        out.write_text(text + "\n" + ("\n" + kept if kept else ""))
        print(f"wrote {args.write}" + (" (kept the sections below its marker)" if kept else ""))


if __name__ == "__main__":
    main()
