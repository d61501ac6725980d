"""Bit-flip sweep of the sandbox: nothing a child accepts can crash the serving process.

    .venv/bin/python benchmarks/fuzz_sandbox.py                       # ciphertext bytes 280-620, every bit (2,720 flips)
    .venv/bin/python benchmarks/fuzz_sandbox.py --start 0 --stop 2000 --bits 0
    .venv/bin/python benchmarks/fuzz_sandbox.py --target public-key --step 2 --bits 0   # key bundles (2 s each)

The issue's sweep (single-bit flips over bytes 280-620 of a ciphertext blob) killed an unprotected
process in 164 of 2,720 cases.  Here every flipped ciphertext (or key bundle whose public key has
the flip, re-framed) goes to a :class:`Sandbox`; whatever the sandbox accepts is then used *in
this process* as a server would (a ciphertext deserialized and run through the model; a bundle's
re-serialized keys installed, after flushing the honest ones, and run), so a crash there would end
this script.  It prints how the flips were refused (child crash by signal, or which check) and how
many passed and ran.  The test suite runs bounded versions (tests/test_sandbox.py,
tests/test_isolation.py).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("ciphertext", "public-key"), default="ciphertext")
    ap.add_argument("--start", type=int, default=280)
    ap.add_argument("--stop", type=int, default=620, help="exclusive")
    ap.add_argument("--step", type=int, default=1, help="flip every step-th byte")
    ap.add_argument("--bits", default="0-7", help="bits to flip in each byte: '0-7' or a comma list")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    lo, _, hi = args.bits.partition("-")
    bits = list(range(int(lo), int(hi) + 1)) if hi else [int(b) for b in args.bits.split(",")]

    from h33_bento import datasets, zoo
    from h33_bento.ckks.context import release_evaluation_keys
    from h33_bento.ckks.keys import EvaluationKeys
    from h33_bento.ckks.sandbox import Sandbox
    from h33_bento.client import FHEInferenceClient
    from h33_bento.compiler import compile
    from h33_bento.errors import EnvelopeError
    from h33_bento.runtime.engine import Engine

    x, y = datasets.mnist_train5k()
    net = zoo.train(zoo.ConvNet(), x, y, epochs=1)
    model = compile(net, (1, 28, 28), calibration_data=x[:128], measure_costs=False)
    client = FHEInferenceClient(model)
    bundle = client.keys.evaluation_keys()
    env = client.encrypt(x[0])
    target = env.ciphertexts[0] if args.target == "ciphertext" else bundle.public_key
    outcomes: collections.Counter[str] = collections.Counter()
    ran = 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Sandbox(model.params, processes=args.processes) as sandbox:
        engine = Engine(model, bundle)
        src, dst = Path(tmp) / "in.h33k", Path(tmp) / "out.h33k"
        for pos in range(args.start, min(args.stop, len(target)), args.step):
            for bit in bits:
                flipped = bytearray(target)
                flipped[pos] ^= 1 << bit
                crashes = sandbox.crashes
                try:
                    if args.target == "ciphertext":
                        sandbox.canonical_ciphertexts([bytes(flipped)], client.keys.key_tag)
                    else:
                        src.write_bytes(dataclasses.replace(bundle, public_key=bytes(flipped)).to_bytes())
                        sandbox.canonical_bundle(src, dst)
                except EnvelopeError as exc:
                    outcomes[f"crashed the child ({str(exc).split('(')[1].split(')')[0]})"
                             if sandbox.crashes > crashes else f"refused: {str(exc)[:60]}"] += 1
                    continue
                outcomes["passed"] += 1
                if args.target == "ciphertext":  # in this process, as the service does next
                    engine.run(dataclasses.replace(env, ciphertexts=[bytes(flipped)]))
                else:
                    release_evaluation_keys()  # so the re-serialized keys, not the honest ones, are used
                    Engine(model, EvaluationKeys.from_bytes(dst.read_bytes(), model.params)).run(env)
                ran += 1
    total = sum(outcomes.values())
    print(f"{total} flips of {args.target} bytes {args.start}..{args.stop - 1} (step {args.step}, bits {bits}) in "
          f"{time.perf_counter() - t0:.0f} s; {ran} passed the sandbox and ran in this process, which survived")
    for what, n in outcomes.most_common():
        print(f"  {n:5d}  {what}")


if __name__ == "__main__":
    main()
