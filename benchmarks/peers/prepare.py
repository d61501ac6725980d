"""Train one network once (torch, project venv) and write what every framework needs.

    .venv/bin/python benchmarks/peers/prepare.py --network convnet --out benchmarks/peers/out

Writes ``<out>/<net>/``:
  weights.pt   canonical state dict (Orion's layer names, see common.LAYERS)
  data.npz     the same weights as arrays (``w/<name>``), the test images and labels, the
               plaintext torch logits (the reference every framework's error is measured against)
               and the calibration batch (first 256 training images)
  meta.json    epochs, seed, learning rate, where the torch definition came from, test accuracy
Reuses an existing result with the same epochs/seed/images unless --force.
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
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(2)
    from h33_bento import datasets, zoo

    from nets import LR, build

    d = os.path.join(args.out, args.network)
    os.makedirs(d, exist_ok=True)
    meta_path = os.path.join(d, "meta.json")
    want = {"network": args.network, "epochs": args.epochs, "seed": args.seed, "images": args.images}
    if not args.force and os.path.exists(meta_path) and os.path.exists(os.path.join(d, "data.npz")):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if all(meta.get(k) == v for k, v in want.items()):
            log(f"{args.network}: reusing trained weights in {d}")
            print(json.dumps(meta))
            return

    x_train, y_train = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    torch.manual_seed(args.seed)
    model, origin = build(args.network)
    log(f"{args.network}: training {origin} for {args.epochs} epochs on {len(x_train)} MNIST images")
    t0 = time.perf_counter()
    model = zoo.train(model, x_train, y_train, epochs=args.epochs, lr=LR[args.network], seed=args.seed)
    train_s = time.perf_counter() - t0
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
    meta = {**want, "lr": LR[args.network], "torch_definition": origin, "train_s": round(train_s, 1),
            "test_accuracy_10k": acc}
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    log(f"{args.network}: test accuracy {acc:.4f} ({train_s:.0f} s); wrote {d}")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
