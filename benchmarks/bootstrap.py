#!/usr/bin/env python3
"""What one 128-bit CKKS bootstrap costs on this machine, at the parameters deep networks get.

    .venv/bin/python benchmarks/bootstrap.py                 # 64, 4096 and 32768 slots
    .venv/bin/python benchmarks/bootstrap.py --slots 4096

The parameters are ``select_bootstrap_params`` (N=2^16, HEStd_128_classic, SPARSE_ENCAPSULATED
secret, level budget [3, 3], scale 2^50, first modulus 58 bits).  Each slot count is measured
afresh by ``measure_bootstrap`` in its own child (keys, precomputations and a few bootstraps;
the compiler uses the same measurement and caches it per machine), one after the other, with
the child's peak resident memory.  Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

from h33_bento.ckks.params import select_bootstrap_params
from h33_bento.ckks.timing import measure_bootstrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, nargs="*", default=[64, 4096, 32768])
    args = ap.parse_args()
    params = select_bootstrap_params(max(args.slots))
    rows = []
    for slots in args.slots:
        t0 = time.perf_counter()
        m = measure_bootstrap(params, slots, refresh=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far
        rows.append(f"| {slots} | {m['ms'] / 1000:.1f} | {m['levels_after']} | {m['error']:.1e} | "
                    f"{m['bound']:g} | {m['keys']} | {wall:.0f} | {peak:.1f} |")
        print(rows[-1], flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"N={params.ring_dim}, depth {params.multiplicative_depth}, {params.security_level}\n")
    print("| slots | s per bootstrap | levels left | max error | input bound | bootstrap keys | wall s (keys + setup + "
          "runs) | peak GiB so far |\n|--:|--:|--:|--:|--:|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
