"""Train one network once (torch, project venv) and write what every framework needs.

    .venv/bin/python benchmarks/peers/prepare.py --network convnet --out benchmarks/peers/out
    .venv/bin/python benchmarks/peers/prepare.py --network resnet20 --out benchmarks/peers/out \
        --weights DIR/resnet20-poly.pt

ResNet-20 is not trained here (half an hour and more): ``--weights`` is the polynomial state dict
``benchmarks/accuracy.py --datasets resnet20 --save DIR`` writes; its images are CIFAR-10 test
images and its calibration batch the first 256 CIFAR-10 training images (as ``benchmarks/deep.py``).

Writes ``<out>/<net>/``:
  weights.pt   canonical state dict (Orion's layer names, see common.LAYERS)
  data.npz     the same weights as arrays (``w/<name>``), the test images and labels, the
               plaintext torch logits (the reference every framework's error is measured against)
               and the calibration batch (first 256 training images)
  meta.json    epochs, seed, learning rate (or the weights file), where the torch definition came
               from, test accuracy
Reuses an existing result with the same epochs/seed/images (weights file) unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import LAYERS, canonical_from_modules, load_canonical_into, log  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--network", required=True, choices=sorted(LAYERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=8, help="test images used for the measurements")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", help="resnet20: the trained polynomial state dict (accuracy.py --save)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if (args.network == "resnet20") != bool(args.weights):
        ap.error("--weights is required for resnet20 and only for it")

    torch.set_num_threads(2)
    from h33_bento import datasets, zoo

    from nets import LR, build, poly_resnet20

    d = os.path.join(args.out, args.network)
    os.makedirs(d, exist_ok=True)
    meta_path = os.path.join(d, "meta.json")
    if args.weights:
        st = os.stat(args.weights)
        want = {"network": args.network, "weights": os.path.abspath(args.weights), "weights_bytes": st.st_size,
                "weights_mtime": st.st_mtime, "images": args.images}
    else:
        want = {"network": args.network, "epochs": args.epochs, "seed": args.seed, "images": args.images}
    if not args.force and os.path.exists(meta_path) and os.path.exists(os.path.join(d, "data.npz")):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if all(meta.get(k) == v for k, v in want.items()) and "test_accuracy" in meta:
            log(f"{args.network}: reusing trained weights in {d}")
            print(json.dumps(meta))
            return

    if args.weights:
        x_train, _ = zoo._data("cifar10", "train")
        x_test, y_test = zoo._data("cifar10", "test")
        model, origin = poly_resnet20(args.weights), build(args.network)[1]
        log(f"{args.network}: {origin} with the weights of {args.weights}")
        facts = {"dataset": "CIFAR-10", "test_images": len(x_test)}
    else:
        x_train, y_train = datasets.mnist_train5k()
        x_test, y_test = datasets.mnist_test()
        torch.manual_seed(args.seed)
        model, origin = build(args.network)
        log(f"{args.network}: training {origin} for {args.epochs} epochs on {len(x_train)} MNIST images")
        t0 = time.perf_counter()
        model = zoo.train(model, x_train, y_train, epochs=args.epochs, lr=LR[args.network], seed=args.seed)
        facts = {"lr": LR[args.network], "train_s": round(time.perf_counter() - t0, 1), "dataset": "MNIST",
                 "test_images": len(x_test)}
    acc = float((zoo.predict_logits(model, x_test).argmax(1) == y_test).mean())

    sd = canonical_from_modules(model, args.network)
    # round trip: the canonical dict reproduces the model exactly
    check, _ = build(args.network)
    load_canonical_into(check.eval(), args.network, sd)
    images, labels = x_test[: args.images], y_test[: args.images]
    ref = zoo.predict_logits(model, images)
    assert np.array_equal(ref, zoo.predict_logits(check, images))

    torch.save(sd, os.path.join(d, "weights.pt"))
    np.savez(
        os.path.join(d, "data.npz"),
        images=images.astype(np.float32), labels=labels, ref_logits=ref,
        calib=x_train[:256].astype(np.float32),
        **{f"w/{k}": v.numpy() for k, v in sd.items()},
    )
    meta = {**want, **facts, "torch_definition": origin, "test_accuracy": acc}
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    log(f"{args.network}: test accuracy {acc:.4f} on {len(x_test)} images; wrote {d}")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
