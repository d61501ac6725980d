"""h33-bento worker: one network, one process (project venv).

    .venv/bin/python benchmarks/peers/worker_h33.py \
        --network convnet --data benchmarks/peers/out/convnet --repeat 3 --json out.json

Loads the shared trained weights into the torch definition of ``nets.py`` and runs it the way a
user would: ``compile`` (128-bit parameters chosen by the compiler), ``FHEInferenceClient``
(key generation), ``encrypt`` / ``infer`` / ``decrypt_logits``.  A request of k <= lanes inputs
is one ciphertext (lanes = 8), so the amortized time at 8 inputs is one request / 8.  A network
that needs bootstrapping (ResNet-20) runs as ``benchmarks/deep.py`` runs it: its multi-GB key
bundle installed once into an ``Engine`` with deep.py's small plaintext cache (``CACHE_MIB``), and
measured chunk by chunk rather than serialized into one second copy.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ (deep.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import load_canonical_into, log, measure_requests, phase, timed, worker_args, write_result  # noqa: E402


def main() -> None:
    args = worker_args()
    torch.set_num_threads(2)

    from h33_bento import FHEInferenceClient, compile
    from h33_bento.runtime.engine import Engine

    from deep import CACHE_MIB
    from nets import build

    data = np.load(os.path.join(args.data, "data.npz"))
    images = data["images"][: args.images].astype(np.float64)
    ref = data["ref_logits"][: args.images]
    labels = data["labels"][: args.images]
    model, origin = build(args.network)
    load_canonical_into(model, args.network, torch.load(os.path.join(args.data, "weights.pt")))
    model.eval()

    log(f"h33 {args.network}: compile + keygen ({origin}) ...")
    phase(args.json, "compile")
    t0 = time.perf_counter()
    compiled = compile(model, images.shape[1:], calibration_data=data["calib"])
    t_compiled = time.perf_counter()
    pp = compiled.params
    params = {"ring_dim": pp.ring_dim, "multiplicative_depth": pp.multiplicative_depth,
              "scale_bits": pp.scale_bits, "security_level": str(pp.security_level),
              "rotation_keys": len(pp.rotation_indices)}
    log(f"h33 {args.network}: compiled in {t_compiled - t0:.1f} s ({params}); key generation ...")
    phase(args.json, "key generation", params=params, compile_s=t_compiled - t0)
    client = FHEInferenceClient(compiled)
    summary = compiled.summary()
    engine = None
    if pp.bootstrapping is None:
        bundle_bytes = len(client.keys.evaluation_keys().to_bytes())
        t_done = t_keys = time.perf_counter()
    else:
        keys = client.keys.evaluation_keys()
        t_keys = time.perf_counter()
        bundle_bytes = sum(len(b) for b in itertools.chain((keys.public_key, keys.mult_key), keys.rotation_chunks()))
        phase(args.json, "key installation", params=params, compile_s=t_compiled - t0, keygen_s=t_keys - t_compiled)
        engine = Engine(compiled, keys, cache_bytes=CACHE_MIB << 20)
        t_done = time.perf_counter()
    result = {
        "framework": "h33", "network": args.network, "torch_definition": origin, "params": params,
        "setup_s": t_done - t0, "compile_s": t_compiled - t0, "keygen_s": t_keys - t_compiled,
        "key_bundle_bytes": bundle_bytes, "lanes": client.lanes,
        "bootstraps": summary.get("bootstraps", 0),
    }
    if engine is not None:
        result.update(install_s=t_done - t_keys, cache_mib=CACHE_MIB)
    result["predicted_ms"] = summary["predicted_latency_ms"]
    result["predicted_client_ms"] = summary["predicted_client_ms"]
    log(f"h33 {args.network}: setup {result['setup_s']:.1f} s, N={pp.ring_dim}, depth {pp.multiplicative_depth}")

    infer = client.infer if engine is None else engine.run

    def request(x: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        t_enc, enc = timed(lambda: client.encrypt(x))
        t_srv, out = timed(lambda: infer(enc))
        t_dec, logits = timed(lambda: client.decrypt_logits(out))
        return t_enc, t_srv, t_dec, np.asarray(logits, dtype=np.float64).reshape(-1, ref.shape[1])

    phase(args.json, "inference")
    batches = [images[i:i + client.lanes] for i in range(0, len(images), client.lanes)]
    result.update(measure_requests(request, images[0], batches, args.repeat, ref, labels, client.lanes))
    # not with bootstrapping: re-pricing builds a second N=2^16 context beside the installed multi-GB
    # bundle (benchmarks/deep.py compares ResNet-20's run with its plan)
    if args.profile_runs and engine is None:
        _profile(result, compiled, client, client._engine, batches[0], max(args.repeat, args.profile_runs))
    log(f"h33 {args.network}: single {result['single_ms']:.0f} ms, amortized {result['amortized_ms']:.0f} ms/img, "
        f"err {result['max_abs_err']:.2e}")
    write_result(args.json, result)


def _profile(result: dict, compiled, client, engine, batch: np.ndarray, requests: int) -> None:
    """The per-layer profile: the program re-priced now, against the median of ``requests`` more requests."""
    priced = compiled.repriced()  # the program priced with costs measured just before these requests
    runs, outside, e2e = [], [], []
    for _ in range(requests):
        t_enc, enc = timed(lambda: client.encrypt(batch))
        t_run, out = timed(lambda: engine.run(enc))
        runs.append(dict(engine.last_timings))
        t_dec, _ = timed(lambda: client.decrypt_logits(out))
        outside.append(t_run - sum(runs[-1].values()))  # (de)serialization, checks, dispatch
        e2e.append(t_enc + t_run + t_dec)
    result["outside_steps_ms"] = float(np.median(outside))
    result["profile_e2e_ms"] = float(np.median(e2e))
    repriced = priced.summary()
    result["profile_predicted_ms"] = repriced["predicted_latency_ms"]
    result["profile_predicted_client_ms"] = repriced["predicted_client_ms"]
    result["layers"] = [{"step": s.name, "op": s.op.value, "level": s.level, "predicted_ms": priced.predicted_ms(s),
                         "compile_predicted_ms": compiled.predicted_ms(s),
                         "measured_ms": float(np.median([r[s.name] for r in runs]))} for s in compiled.steps]


if __name__ == "__main__":
    main()
