"""The ConvNet's 8-image encrypted pass under a competing CPU load: OpenMP's defaults vs ours, and Orion.

    .venv/bin/python benchmarks/cpu_contention.py                   # quiet and loaded, h33 before/after + Orion
    .venv/bin/python benchmarks/cpu_contention.py --repeat 1 --loads busy   # a quick check

Issue 11 (defect 9): with another process busy on the cores and OpenMP's default waiting (threads
spin while they wait, one per core), the pass went from ~0.2 s to 19 s, ~10x worse than with
``OMP_WAIT_POLICY=PASSIVE``; ``import h33_bento`` now sets passive waiting and a thread count
within the process's CPU budget (``h33_bento/_omp.py``).  This runs, in one go and for each load:

* **h33-bento, before**: the peer suite's h33 worker with OpenMP's own defaults.  The worker is
  started with no ``OMP_*`` variables and ``openfhe`` imported before ``h33_bento``, so OpenMP
  reads its settings before h33's defaults exist (exactly the library's old behaviour);
* **h33-bento, after**: the same worker, plain (h33's defaults apply);
* **Orion** (``benchmarks/peers/worker_orion.py``, its venv from ``bash benchmarks/peers/setup.sh
  orion``), one image per ciphertext: its 8-image pass is 8 sequential requests.

Loads: ``quiet`` (nothing else running) and ``busy`` (one busy-loop process per CPU this process
may use, for the whole row).  Each worker compiles and generates keys, then times ``--repeat``
8-image passes after a warm-up (``benchmarks/peers/common.measure_requests``).  Prints a markdown
table and writes it to ``--results``; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, PEERS)

from run import default_python, machine, run_worker, tail  # noqa: E402

#: runs the h33 worker with OpenFHE (and so OpenMP) loaded before h33_bento can set its defaults
BEFORE = ("import sys, runpy, warnings; warnings.simplefilter('ignore', RuntimeWarning); import openfhe; "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
CONFIGS = {
    "h33-before": ("h33-bento, OpenMP defaults (before)", "h33"),
    "h33-after": ("h33-bento, h33 defaults (after)", "h33"),
    "orion": ("Orion 1.0.2", "orion"),
}


def hogs(n: int) -> list[subprocess.Popen]:
    """``n`` busy-loop processes: the competing load."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_one(config: str, args: argparse.Namespace, data: str, out: str, load: str) -> dict:
    fw = CONFIGS[config][1]
    py = default_python(fw)
    if not os.path.exists(py):
        return {"status": "missing", "why": f"{py} not found: run `bash benchmarks/peers/setup.sh {fw}`"}
    js = os.path.join(out, f"{config}_{load}.json")
    worker = os.path.join(PEERS, f"worker_{fw}.py")
    wargs = [worker, "--network", "convnet", "--data", data, "--images", "8", "--repeat", str(args.repeat),
             "--json", js] + (["--profile-runs", "0"] if fw == "h33" else [])
    env = dict(os.environ)
    if config == "h33-before":
        cmd = [py, "-c", BEFORE, *wargs]
        for k in [k for k in env if k.startswith("OMP_")]:
            del env[k]
    else:
        cmd = [py, *wargs]
    if os.path.exists(js):
        os.remove(js)
    log_path = os.path.join(out, "logs", f"{config}_{load}.log")
    r = run_worker(cmd, log_path, 20 << 20, 2 << 20, args.timeout, env=env)
    if r["status"] != "ok" or not os.path.exists(js):
        return {"status": r["status"], "why": r.get("why") or tail(log_path, 3)}
    with open(js) as fh:
        return {"status": "ok", **json.load(fh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="timed 8-image passes per worker (median)")
    ap.add_argument("--loads", default="quiet,busy")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)), help="busy-loop processes (busy load)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    ap.add_argument("--out", default=os.path.join(PEERS, "out"))
    ap.add_argument("--results", default=os.path.join(PEERS, "out", "cpu_contention.md"))
    args = ap.parse_args()
    loads = [x for x in args.loads.split(",") if x]
    configs = [x for x in args.configs.split(",") if x]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    command = " ".join([".venv/bin/python", os.path.relpath(__file__, ROOT), *map(shlex.quote, sys.argv[1:])])
    prep = run_worker([default_python("h33"), os.path.join(PEERS, "prepare.py"), "--network", "convnet", "--out",
                       args.out], os.path.join(args.out, "logs", "prepare_convnet.log"), 20 << 20, 2 << 20,
                      args.timeout)
    if prep["status"] != "ok":
        sys.exit(f"training the ConvNet failed:\n{tail(os.path.join(args.out, 'logs', 'prepare_convnet.log'))}")
    data = os.path.join(args.out, "convnet")
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    rows: dict[tuple[str, str], dict] = {}
    for load in loads:
        procs = hogs(args.hogs) if load == "busy" else []
        try:
            for config in configs:
                print(f"[{time.strftime('%H:%M:%S')}] {load}: {config} ...", file=sys.stderr, flush=True)
                rows[config, load] = run_one(config, args, data, args.out, load)
        finally:
            for p in procs:
                p.kill()
                p.wait()

    def cell(r: dict | None, key: str) -> str:
        if r is None:
            return ""
        return f"{r[key]:.0f}" if r["status"] == "ok" else f"{r['status']}: {r.get('why', '')[:80]}"

    head = "| configuration | " + " | ".join(f"{load}: 8-image pass ms (server ms)" for load in loads)
    if "quiet" in loads and "busy" in loads:
        head += " | busy / quiet"
    lines = [head + " |", "|---" * (1 + len(loads) + ("quiet" in loads and "busy" in loads)) + "|"]
    for config in configs:
        cells = [f"{cell(rows.get((config, lo)), 'batch_ms')} ({cell(rows.get((config, lo)), 'batch_server_ms')})"
                 for lo in loads]
        q, b = rows.get((config, "quiet")), rows.get((config, "busy"))
        if q is not None and b is not None:
            cells.append(f"{b['batch_ms'] / q['batch_ms']:.1f}x" if q["status"] == b["status"] == "ok" else "")
        lines.append(f"| {CONFIGS[config][0]} | " + " | ".join(cells) + " |")
    text = "\n".join([
        f"Run {started} on {machine()}, load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"busy = {args.hogs} busy-loop processes; median of {args.repeat} pass(es) of 8 real MNIST test images "
        "end to end (encrypt + server + decrypt; h33-bento: one 8-lane ciphertext, Orion: 8 one-image requests).",
        "", "```", command, "```", "", *lines, ""])
    with open(args.results, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
