"""End-to-end encrypted inference on real MNIST digits.

Train a small CNN (conv + BatchNorm + x^2 + average pooling + dense) on 5,000 MNIST images,
compile it to CKKS at 128-bit security, encrypt 8 real test images into ONE ciphertext,
run the network on the ciphertext with evaluation keys only, decrypt, and print predictions,
accuracy and timings.  Run with ``make demo``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from h33_bento import FHEInferenceClient, compile, simulate
from h33_bento import datasets, zoo


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    x_train, y_train = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    model = zoo.train(zoo.MnistCNN(), x_train, y_train, epochs=8)
    plain_acc = (zoo.predict_logits(model, x_test).argmax(1) == y_test).mean()
    print(f"trained MnistCNN on 5k images in {time.perf_counter() - t0:.1f} s; "
          f"plaintext accuracy on the 10k test set: {plain_acc:.4f}")

    t0 = time.perf_counter()
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:512], labels=[str(i) for i in range(10)],
                       progress=True)
    compile_s = time.perf_counter() - t0
    print(compiled.report)
    sim_acc = (simulate(compiled, x_test).argmax(1) == y_test).mean()
    print(f"compiled in {compile_s:.1f} s; compiled program (simulate) accuracy on 10k: {sim_acc:.4f}")

    t0 = time.perf_counter()
    client = FHEInferenceClient(compiled)
    bundle = client.keys.evaluation_keys()
    keygen_s = time.perf_counter() - t0
    images, labels = x_test[:8], y_test[:8]

    t0 = time.perf_counter()
    enc = client.encrypt(images)
    encrypt_s = time.perf_counter() - t0
    client.infer(enc)  # first pass encodes and caches the plaintext diagonals
    t0 = time.perf_counter()
    out = client.infer(enc)
    server_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = client.decrypt(out)
    decrypt_s = time.perf_counter() - t0

    reference = zoo.predict_logits(model, images)
    err = np.abs(client.decrypt_logits(out) - reference).max()
    print("\nimage  true  encrypted-prediction  confidence  top-3")
    for i, (p, y) in enumerate(zip(preds, labels)):
        print(f"{i:>5}  {y:>4}  {p.label:>20}  {p.confidence:>10.3f}  {p.top_k(3)}")
    correct = sum(p.index == y for p, y in zip(preds, labels))
    print(f"\nencrypted accuracy: {correct}/8; max |logit error| vs plaintext torch: {err:.2e}")
    print(f"keygen {keygen_s * 1000:.0f} ms (evaluation keys {bundle.size_bytes / 2**20:.1f} MiB), "
          f"encrypt {encrypt_s * 1000:.0f} ms, server {server_s * 1000:.0f} ms, decrypt {decrypt_s * 1000:.0f} ms "
          f"for 8 images -> {server_s * 1000 / 8:.1f} ms/image amortized on the server")


if __name__ == "__main__":
    main()
