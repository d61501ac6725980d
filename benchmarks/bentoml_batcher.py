"""How BentoML's own adaptive batcher splits a burst of 8 requests, against the lane packer's one run.

Why this exists: the service packs requests into ciphertext lanes with its own ``LanePacker``
instead of ``@bentoml.api(batchable=True, max_batch_size=8)``.  This measures the alternative:
a stand-in service whose batchable API takes ``--run-s`` per batch (one encrypted run), served
by a real ``bentoml serve``, gets ``--bursts`` bursts of ``--requests`` requests, sent
``--stagger-ms`` apart.  Requests belong to ``--tenants`` tenants in turn, and the API runs once per tenant in a batch
(ciphertexts under different keys cannot share a run).  It prints how many engine runs each
burst became and the lanes each run filled.

    .venv/bin/python benchmarks/bentoml_batcher.py --bursts 6 --run-s 1.0
    .venv/bin/python benchmarks/bentoml_batcher.py --bursts 4 --run-s 1.0 --requests 16 --stagger-ms 100
    .venv/bin/python benchmarks/bentoml_batcher.py --bursts 4 --run-s 1.0 --requests 16 --tenants 2
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

SERVICE = '''
import os, time, uuid
import bentoml

RUN_S = float(os.environ["RUN_S"])
TENANTS = int(os.environ["TENANTS"])

@bentoml.service(workers=1)
class Stand:
    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=60_000)
    def run(self, xs: list[float]) -> list[str]:
        # a request's tenant is int(x) % TENANTS; ciphertexts of different keys cannot share a run
        groups = {}
        for i, x in enumerate(xs):
            groups.setdefault(int(x) % TENANTS, []).append(i)
        out = [""] * len(xs)
        for members in groups.values():
            time.sleep(RUN_S)  # one encrypted run per key, whatever its lane count
            run = uuid.uuid4().hex[:8]
            for i in members:
                out[i] = f"{run}:{len(members)}"
        return out
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _burst(url: str, n: int, stagger_s: float) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> str:
            await asyncio.sleep(i * stagger_s)
            return (await client.post(f"{url}/run", json={"xs": [float(i)]})).json()[0]
        return list(await asyncio.gather(*(one(i) for i in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", type=int, default=6)
    ap.add_argument("--run-s", type=float, default=1.0, help="seconds one batch takes (an encrypted run)")
    ap.add_argument("--gap-s", type=float, default=3.0, help="idle seconds between bursts")
    ap.add_argument("--requests", type=int, default=8, help="requests per burst")
    ap.add_argument("--tenants", type=int, default=1, help="request i belongs to tenant i %% tenants")
    ap.add_argument("--stagger-ms", type=float, default=0.0, help="delay between the requests of a burst")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "stand.py").write_text(textwrap.dedent(SERVICE))
        port = _free_port()
        env = dict(os.environ, RUN_S=str(args.run_s), TENANTS=str(args.tenants), BENTOML_HOME=str(Path(tmp, "home")))
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "stand:Stand", "--port", str(port),
                                 "--host", "127.0.0.1"], cwd=tmp, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the stand-in service did not start")
                time.sleep(0.5)
            batches_per_burst, fills = [], []
            for b in range(args.bursts):
                time.sleep(args.gap_s)
                tags = asyncio.run(_burst(url, args.requests, args.stagger_ms / 1000))
                sizes = {}
                for tag in tags:
                    batch, size = tag.split(":")
                    sizes[batch] = int(size)
                batches_per_burst.append(len(sizes))
                fills.extend(sizes.values())
                print(f"burst {b + 1}: {len(sizes)} engine runs, lanes per run {sorted(sizes.values(), reverse=True)}")
            print(f"batches per burst of {args.requests} ({args.stagger_ms:g} ms apart): median "
                  f"{statistics.median(batches_per_burst)} engine runs (range {min(batches_per_burst)}-"
                  f"{max(batches_per_burst)}), {statistics.mean(fills):.1f} of 8 lanes per run on average")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
