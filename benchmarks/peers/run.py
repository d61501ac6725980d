#!/usr/bin/env python3
"""Peer comparison: h33-bento vs Orion (orion-fhe 1.0.2) vs TenSEAL (0.3.16), side by side.

    bash benchmarks/peers/setup.sh            # once: creates .venv-orion (py3.11) and .venv-tenseal
    .venv/bin/python benchmarks/peers/run.py --networks convnet,lola,lenet5 \
        --frameworks h33,orion,tenseal --images 8 --repeat 3

Every network is trained once in torch (project venv, ``prepare.py``; ResNet-20's trained weights
come from ``--resnet20-weights``) and the same weights are loaded by every framework.  Each
(network, framework) pair then runs in its own subprocess, in its own venv, one after the other,
under an RSS watchdog (killed and reported "OOM" above --mem-limit-gb, or when the machine's
available memory drops below --min-free-gb; a worker the kernel kills, or whose log says it ran
out of memory, is reported "OOM" too).  Peak memory
is the worker's ru_maxrss (os.wait4).  All parameters are 128-bit secure (see common.py).

Writes one markdown table (ratios against the best peer) to --results (and prints it), every
raw result to <out>/results.json and each worker's log to <out>/logs/.  Stdlib only: runs with
any Python >= 3.8.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import (FRAMEWORKS, HE_STD_128_MAX_LOGQP, LATTIGO_BOOTSTRAP_BITS, NETWORKS, ORION_BOOT_LOGP,  # noqa: E402
                    ORION_PARAMS, TENSEAL_PARAMS, TITLES, orion_logqp)

WORKER = {"h33": "worker_h33.py", "orion": "worker_orion.py", "tenseal": "worker_tenseal.py"}
PEERS = ("orion", "tenseal")
#: what others published, for a network a peer cannot run here (other CPUs: an order of magnitude only)
PUBLISHED = {"resnet20": "Orion about 1,040 s per image (1 thread, Xeon E5-2690 v4), OpenFHE's "
                         "LowMemoryFHEResNet20 about 384 s per image (2 threads, Ryzen 9 7950X)"}
NAMES = {"h33": "h33-bento", "orion": "Orion 1.0.2", "tenseal": "TenSEAL 0.3.16"}


def default_python(fw: str) -> str:
    return {"h33": os.path.join(ROOT, ".venv", "bin", "python"),
            "orion": os.path.join(HERE, ".venv-orion", "bin", "python"),
            "tenseal": os.path.join(HERE, ".venv-tenseal", "bin", "python")}[fw]


def rel(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- subprocesses

def _proc_kib(path: str, field: str) -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_worker(cmd: list[str], log_path: str, mem_limit_kib: int, min_free_kib: int, timeout_s: float,
               env: dict | None = None) -> dict:
    """Run ``cmd`` (in ``env``, default this process's environment); kill it above the memory limit /
    below the free-memory floor / at timeout.

    Returns {"rc", "status": ok|oom|timeout|failed, "peak_rss_kib", "wall_s", "why"}."""
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
        killed: dict = {}
        done = threading.Event()

        def watchdog() -> None:
            peak = 0
            while not done.wait(0.2):
                rss = _proc_kib(f"/proc/{proc.pid}/status", "VmRSS:")
                if rss is None:
                    continue
                peak = max(peak, rss)
                avail = _proc_kib("/proc/meminfo", "MemAvailable:")
                why = None
                if rss > mem_limit_kib:
                    why = f"RSS {rss / 2**20:.1f} GiB > limit {mem_limit_kib / 2**20:.1f} GiB"
                elif avail is not None and avail < min_free_kib:
                    why = (f"machine memory nearly exhausted (available {avail / 2**20:.1f} GiB, "
                           f"worker RSS {rss / 2**20:.1f} GiB)")
                elif time.perf_counter() - t0 > timeout_s:
                    killed.update(status="timeout", why=f"still running after {timeout_s:.0f} s")
                    proc.send_signal(signal.SIGKILL)
                    return
                if why:
                    killed.update(status="oom", why=why, rss_kib=rss)
                    proc.send_signal(signal.SIGKILL)
                    return

        th = threading.Thread(target=watchdog, daemon=True)
        th.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        th.join()
    out = {"rc": proc.returncode, "peak_rss_kib": int(usage.ru_maxrss), "wall_s": time.perf_counter() - t0}
    if killed:
        out.update(status=killed["status"], why=killed["why"])
    elif proc.returncode == -signal.SIGKILL:  # not ours: the kernel's OOM killer
        out.update(status="oom", why=f"killed by SIGKILL outside the watchdog (out of memory), RSS peak "
                                     f"{usage.ru_maxrss / 2**20:.1f} GiB")
    elif proc.returncode != 0 and _out_of_memory(log_path):
        out.update(status="oom", why=_out_of_memory(log_path))
    else:
        out["status"] = "ok" if proc.returncode == 0 else "failed"
    return out


#: how an allocation failure reads in a worker's log: the Go runtime (Orion's Lattigo), Python, C++.
_OOM_MARKS = ("runtime: out of memory", "MemoryError", "std::bad_alloc", "Cannot allocate memory")


def _out_of_memory(log_path: str) -> str | None:
    """The log line that says the worker ran out of memory, if one does."""
    return next((ln for ln in tail(log_path, 40).splitlines() if any(m in ln for m in _OOM_MARKS)), None)


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh.read().replace("\r", "\n").splitlines() if ln.strip()]
        return "\n".join(lines[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------- formatting

METRICS = [  # key, header, formatter
    ("setup_s", "setup s", lambda v: f"{v:.1f}"),
    ("key_bundle_bytes", "eval keys MiB", lambda v: f"{v / 2**20:.0f}"),
    ("single_ms", "1-image latency ms", lambda v: f"{v:.0f}"),
    ("amortized_ms", "ms/image @{k}", lambda v: f"{v:.0f}"),
    ("peak_rss_bytes", "peak RSS MiB", lambda v: f"{v / 2**20:.0f}"),
    ("max_abs_err", "max abs err", lambda v: f"{v:.1e}"),
]


def params_str(r: dict) -> str:
    p = r.get("params") or {}
    if r["framework"] == "h33" and p:
        return f"N=2^{p['ring_dim'].bit_length() - 1}, depth {p['multiplicative_depth']}, 2^{p['scale_bits']}"
    if r["framework"] == "orion" and p:
        boot = f" (bootstrapping {p['bootLogQP']})" if p.get("bootLogQP") else ""
        return f"N=2^{p['LogN']}, logQP {p['logQP']}{boot}, 2^{p['LogScale']}"
    if r["framework"] == "tenseal" and p:
        n = p["poly_modulus_degree"]
        return f"N=2^{n.bit_length() - 1}, logQP {p['logQP']}, 2^{p['scale_bits']}"
    return ""


def ratio(v: float, best: float | None) -> str:
    if best is None or best <= 0 or v is None:
        return ""
    r = v / best
    return f" ({r:.2f}x)" if r >= 0.01 else f" ({r:.0e}x)"


def table(results: list[dict], networks: list[str], frameworks: list[str], k: int) -> str:
    heads = ["network", "framework", "parameters"] + [h.format(k=k) for _, h, _ in METRICS] + [f"correct / {k}"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * (len(METRICS) + 1)) + "|"]
    for net in networks:
        rows = [r for r in results if r["network"] == net]
        ok = [r for r in rows if r.get("status") == "ok"]
        best = {}
        for key, _, _ in METRICS:
            vals = [r[key] for r in ok if r["framework"] in PEERS and r.get(key) is not None]
            best[key] = min(vals) if vals else None
        first = True
        for fw in frameworks:
            r = next((x for x in rows if x["framework"] == fw), None)
            if r is None:
                continue
            cells = [net if first else "", NAMES[fw], params_str(r)]
            first = False
            if r.get("status") != "ok":
                label = {"oom": "**OOM**", "timeout": "**timeout**", "skipped": "n/a",
                         "missing": "not installed", "failed": "**failed**"}.get(r.get("status"), r.get("status"))
                if r.get("phase") and r.get("status") in ("oom", "timeout"):
                    label += f" in {r['phase']}"
                rest = [""] * (len(METRICS) - 1)
                if r.get("status") == "oom" and r.get("peak_rss_bytes"):
                    rest[[k for k, _, _ in METRICS].index("peak_rss_bytes") - 1] = \
                        f"> {r['peak_rss_bytes'] / 2**20:.0f} (killed)"
                cells += [label] + rest + [""]
            else:
                for key, _, fmt in METRICS:
                    v = r.get(key)
                    bound = ">= " if key == "key_bundle_bytes" and r.get("key_bundle_lower_bound") else ""
                    cells.append("" if v is None else bound + fmt(v) + ratio(v, best[key]))
                cells.append(f"{r.get('correct', '')}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: list[dict], k: int) -> str:
    heads = ["network", "framework", "status", "compile/setup detail", "cold 1st request ms",
             "1-image server ms", f"server ms/image @{k}", "lanes / ciphertext", "argmax = plaintext",
             "worker wall s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * len(heads)) + "|"]
    for r in results:
        st = r.get("status")
        if st == "ok":
            if r["framework"] == "h33":
                detail = f"compile {r['compile_s']:.1f} s + keygen {r['keygen_s']:.1f} s"
                if "install_s" in r:
                    detail += (f" + key installation {r['install_s']:.1f} s; {r['bootstraps']} bootstraps, "
                               f"{r['cache_mib']} MiB plaintext cache")
            elif r["framework"] == "orion":
                detail = (f"init_scheme {r['init_scheme_s']:.1f} s + fit {r['fit_s']:.1f} s + "
                          f"compile {r['compile_s']:.1f} s; {r['galois_keys']} Galois keys + relin, "
                          f"{r['key_bytes_each'] / 2**20:.1f} MiB each")
                if r.get("bootstrapper_logslots"):
                    detail += (f"; {r['bootstraps']} bootstraps, one bootstrapper (own key set, not counted) "
                               f"per logslots {r['bootstrapper_logslots']}")
            else:
                detail = f"context + keygen {r['keygen_s']:.1f} s"
            vals = [f"{r['cold_request_ms']:.0f}", f"{r['single_server_ms']:.0f}",
                    f"{r['amortized_server_ms']:.0f}", str(r.get("lanes", 1)),
                    f"{r['argmax_agree']}/{r['batch_images']}"]
        else:
            detail = r.get("why") or r.get("reason") or ""
            vals = [""] * 5
        wall = r.get("wall_s")
        lines.append("| " + " | ".join([r["network"], NAMES[r["framework"]], st or "", detail] + vals
                                        + ["" if wall is None else f"{wall:.0f}"]) + " |")
    return "\n".join(lines)


def profiles(results: list[dict]) -> str:
    """h33-bento's per-layer profile: the plan's predicted time (primitive costs measured again
    just before the profiled requests) next to the engine's measured time, and the end-to-end
    overhead over the plan."""
    out = []
    for r in results:
        if r["framework"] != "h33" or r.get("status") != "ok" or not r.get("layers"):
            continue
        server = r.get("profile_predicted_ms", r.get("predicted_ms")) or 0.0
        plan_e2e = server + (r.get("profile_predicted_client_ms", r.get("predicted_client_ms")) or 0.0)
        e2e = r.get("profile_e2e_ms", r["batch_ms"])
        out += [f"**{r['network']}**: one 8-image ciphertext, program steps {sum(x['measured_ms'] for x in r['layers']):.0f} ms "
                f"measured (median per step) vs {sum(x['predicted_ms'] for x in r['layers']):.0f} ms predicted "
                f"({sum(x.get('compile_predicted_ms', x['predicted_ms']) for x in r['layers']):.0f} ms with the costs "
                f"measured at compile time); server with (de)serialization {server:.0f} ms predicted; end to end "
                f"(encrypt + server + decrypt, median of the same requests) {e2e:.0f} ms vs {plan_e2e:.0f} ms predicted "
                f"= **{e2e / plan_e2e:.2f}x** the sum of the plan's primitive operations"
                + (f"; the engine's own time outside the program steps (deserialize, serialize, checks): "
                   f"{r['outside_steps_ms']:.1f} ms per run." if "outside_steps_ms" in r else "."), "",
                "| step | op | level | predicted ms | measured ms | measured / predicted |", "|---|---|--:|--:|--:|--:|"]
        for x in r["layers"]:
            ratio = x["measured_ms"] / x["predicted_ms"] if x["predicted_ms"] else float("nan")
            out.append(f"| `{x['step']}` | {x['op']} | {x['level']} | {x['predicted_ms']:.1f} | "
                       f"{x['measured_ms']:.1f} | {ratio:.2f} |")
        out.append("")
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = _proc_kib("/proc/meminfo", "MemTotal:") or 0
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}"


def security_notes(networks: list[str]) -> str:
    out = ["128-bit parameters (HomomorphicEncryption.org standard, classical, ternary secret: "
           + ", ".join(f"log2(QP) <= {v} at N=2^{k}" for k, v in HE_STD_128_MAX_LOGQP.items()) + "):", ""]
    for net in networks:
        p = ORION_PARAMS[net]
        qp, boot_qp = orion_logqp(net)
        limit = HE_STD_128_MAX_LOGQP[p["LogN"]]
        boot = (f"bootstrapping (Lattigo's default circuit, {LATTIGO_BOOTSTRAP_BITS} bits of moduli, key switching "
                f"LogP={ORION_BOOT_LOGP[net]}): log2(QP) = {boot_qp} <= {limit}" if boot_qp else "no bootstrapping")
        out.append(f"- Orion {net}: LogN={p['LogN']}, LogQ={p['LogQ']}, LogP={p['LogP']} -> log2(QP) = {qp} <= "
                   f"{limit}; standard ring, ternary secret of Hamming weight "
                   f"round(2N/3) = {round(2 * (1 << p['LogN']) / 3)}, scale 2^{p['LogScale']}; {boot}.")
        if net in TENSEAL_PARAMS:
            t = TENSEAL_PARAMS[net]
            out.append(f"- TenSEAL {net}: N={t['poly_modulus_degree']}, coeff_mod_bit_sizes="
                       f"{t['coeff_mod_bit_sizes']} -> {sum(t['coeff_mod_bit_sizes'])} bits; scale 2^{t['scale_bits']}.")
    out.append("- h33-bento: parameters chosen by `compile` for HEStd_128_classic (OpenFHE enforces the table).")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default=",".join(n for n in NETWORKS if n != "resnet20"),
                    help="comma-separated; resnet20 (not trained here, hours encrypted) only when named, "
                    "with --resnet20-weights")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--images", type=int, default=8, help="real test images (the amortized batch)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (weights cached in --out)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--results", default=os.path.join(HERE, "results.md"))
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="kill a worker above this RSS: OOM")
    ap.add_argument("--min-free-gb", type=float, default=2.0,
                    help="kill a worker when the machine's available memory falls below this: OOM")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    for fw in FRAMEWORKS:
        ap.add_argument(f"--{fw}-python", default=default_python(fw), help=f"interpreter of the {fw} venv")
    ap.add_argument("--force-train", action="store_true")
    ap.add_argument("--resnet20-weights", help="resnet20: the trained polynomial ResNet-20 "
                    "(benchmarks/accuracy.py --datasets resnet20 --save DIR writes DIR/resnet20-poly.pt)")
    args = ap.parse_args()
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for n in networks:
        if n not in NETWORKS:
            ap.error(f"unknown network {n!r} (choose from {', '.join(NETWORKS)})")
    if "resnet20" in networks and not args.resnet20_weights:
        ap.error("resnet20 needs --resnet20-weights (it is not trained here)")
    for f in frameworks:
        if f not in FRAMEWORKS:
            ap.error(f"unknown framework {f!r} (choose from {', '.join(FRAMEWORKS)})")

    py = {fw: getattr(args, f"{fw}_python") for fw in FRAMEWORKS}
    if not os.path.exists(py["h33"]):
        sys.exit(f"project venv not found at {py['h33']}: run `make install` first")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    rel_py = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT + os.sep) else "python3"
    command = " ".join([rel_py, os.path.relpath(os.path.abspath(__file__), ROOT)]
                       + [shlex.quote(a) for a in sys.argv[1:]])
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    mem_limit_kib = int(args.mem_limit_gb * 2**20)
    min_free_kib = int(args.min_free_gb * 2**20)

    results: list[dict] = []
    prep_meta: dict[str, dict] = {}
    for net in networks:
        d = os.path.join(args.out, net)
        cmd = [py["h33"], os.path.join(HERE, "prepare.py"), "--network", net, "--out", args.out,
               "--images", str(args.images), "--epochs", str(args.epochs)] + (["--force"] if args.force_train else [])
        cmd += ["--weights", args.resnet20_weights] if net == "resnet20" else []
        log(f"{net}: preparing trained weights ...")
        r = run_worker(cmd, os.path.join(args.out, "logs", f"prepare_{net}.log"), mem_limit_kib, min_free_kib,
                       args.timeout)
        if r["status"] != "ok":
            sys.exit(f"training {net} failed ({r['status']}):\n{tail(os.path.join(args.out, 'logs', f'prepare_{net}.log'))}")
        with open(os.path.join(d, "meta.json")) as fh:
            prep_meta[net] = json.load(fh)

        for fw in frameworks:
            base = {"framework": fw, "network": net}
            if not os.path.exists(py[fw]):
                results.append({**base, "status": "missing",
                                "why": f"{py[fw]} not found: run `bash benchmarks/peers/setup.sh`"})
                log(f"{net}/{fw}: venv missing ({py[fw]})")
                continue
            js = os.path.join(args.out, f"{fw}_{net}.json")
            for stale in (js, js + ".phase"):
                if os.path.exists(stale):
                    os.remove(stale)
            cmd = [py[fw], os.path.join(HERE, WORKER[fw]), "--network", net, "--data", d,
                   "--images", str(args.images), "--repeat", str(args.repeat), "--json", js]
            logp = os.path.join(args.out, "logs", f"{fw}_{net}.log")
            log(f"{net}/{fw}: running (log {rel(logp)}) ...")
            r = run_worker(cmd, logp, mem_limit_kib, min_free_kib, args.timeout)
            row = {**base, "wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_kib"] * 1024}
            if r["status"] == "ok" and os.path.exists(js):
                with open(js) as fh:
                    row.update(json.load(fh))
                row.setdefault("status", "ok")
            else:
                row["status"] = r["status"] if r["status"] != "ok" else "failed"
                row["why"] = r.get("why") or f"exit code {r['rc']}: " + tail(logp, 3).replace("\n", " / ")
                try:
                    with open(js + ".phase") as fh:
                        facts = json.load(fh)
                    row.update({k: v for k, v in facts.items() if k not in row})
                    row["why"] += f", during {row['phase']}"
                except (OSError, ValueError):
                    pass
            if os.path.exists(js + ".phase"):
                os.remove(js + ".phase")
            results.append(row)
            msg = row["status"] if row["status"] != "ok" else (
                f"single {row['single_ms']:.0f} ms, {row['amortized_ms']:.0f} ms/image, "
                f"peak {row['peak_rss_bytes'] / 2**30:.2f} GiB")
            log(f"{net}/{fw}: {msg}" + (f" - {row.get('why') or row.get('reason')}" if row["status"] != "ok" else ""))

    load_end = os.getloadavg()
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"command": command, "started": started, "machine": machine(), "load_start": load_start,
                   "load_end": load_end, "training": prep_meta, "results": results}, fh, indent=2, default=float)

    k = args.images
    md = [
        "# Peer comparison: h33-bento vs Orion vs TenSEAL",
        "",
        "Reproduce (from the repository root; `bash benchmarks/peers/setup.sh` once creates the peer venvs):",
        "",
        "```",
        command,
        "```",
        "",
        f"Run {started} on {machine()}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
        "(timings are only comparable on an otherwise idle machine).",
        "",
        table(results, networks, frameworks, k),
        "",
        f"Ratios `(r x)` are against the best peer (Orion or TenSEAL) for that network and column; lower is "
        f"better everywhere. Latencies are client-observed (encrypt + server + decrypt), median of {args.repeat} "
        f"run(s) after one untimed warm-up request. `ms/image @{k}`: {k} real test images end to end, divided "
        f"by {k} (h33-bento packs up to 8 images in one ciphertext; Orion and TenSEAL encrypt one image per "
        f"ciphertext, so theirs are {k} sequential requests). Setup: from a trained torch model to ready-to-infer "
        "(compile + key generation). Eval keys: the evaluation-key bundle a server needs (relinearization + "
        "rotation keys; Orion: number of distinct Galois keys + 1 times one serialized Lattigo key). Peak RSS: "
        "the worker process's ru_maxrss (each framework/network pair in its own process). Max abs err: largest "
        f"|decrypted logit - plaintext torch logit| over the {k} images; `correct`: argmax equals the label.",
        "",
        "Networks (one set of trained weights per network, loaded by every framework):",
        "",
    ]
    for net in networks:
        m = prep_meta[net]
        how = (f"weights {rel(m['weights'])}" if "weights" in m else
               f"trained {m['epochs']} epochs on 5,000 MNIST images")
        md.append(f"- {net}: {TITLES[net]}; {how} (test accuracy {m['test_accuracy']:.4f} on {m['test_images']:,} "
                  f"{m['dataset']} test images); torch definition `{m['torch_definition']}`.")
        orion = next((r for r in results if r["network"] == net and r["framework"] == "orion"), None)
        if net in PUBLISHED and orion is not None and orion.get("status") != "ok":
            md.append(f"  Orion did not complete here ({orion.get('status')}: {orion.get('why', '')}); "
                      f"published figures instead: {PUBLISHED[net]}.")
    md += ["", security_notes(networks), "", "Details:", "", details(results, k), ""]
    prof = profiles(results)
    if prof:
        md += ["h33-bento per-layer profile (median of five more 8-image requests of each network; the plan re-priced with primitive costs measured just before them):", "", prof]
    text = "\n".join(md)
    with open(args.results, "w") as fh:
        fh.write(text)
    print(text)
    log(f"wrote {rel(args.results)} and {rel(os.path.join(args.out, 'results.json'))}")


if __name__ == "__main__":
    main()
