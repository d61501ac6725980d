"""Train -> compile -> log to MLflow -> serve with BentoML -> encrypted round trip over HTTP.

1. train the MNIST CNN (conv + BatchNorm + x^2 + pooling + dense) on 5,000 real images;
2. compile it to CKKS (128-bit security, 8 lanes per ciphertext);
3. log it to MLflow (an embedded store under ./artifacts by default; set MLFLOW_TRACKING_URI to
   use a real server) and register it as ``models:/h33-mnist@prod``;
4. start ``bentoml serve`` on the registered model, with one tenant and its API key;
5. as that tenant: generate keys, upload the evaluation keys, send 8 single-image requests at once
   (the server packs them into the 8 lanes of ONE encrypted run) and one 8-image request, decrypt,
   and print predictions, accuracy and timings; then stop the server.

    python examples/serve_end_to_end.py [--port 3000] [--artifacts ./artifacts] [--keep-serving]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_and_compile(artifacts: Path):
    import torch

    from h33_bento import compile, datasets, simulate, zoo

    torch.set_num_threads(2)
    x_train, y_train = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    t0 = time.perf_counter()
    weights = artifacts / "mnist_cnn.pt"
    model = zoo.MnistCNN()
    if weights.exists():  # a previous run's training: reuse it
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        print(f"[1/5] loaded the trained MnistCNN from {weights}")
    else:
        model = zoo.train(model, x_train, y_train, epochs=8)
        torch.save(model.state_dict(), weights)
        print(f"[1/5] trained MnistCNN on 5,000 MNIST images in {time.perf_counter() - t0:.1f} s")
    plain_acc = float((zoo.predict_logits(model, x_test).argmax(1) == y_test).mean())
    t0 = time.perf_counter()
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:512], labels=[str(i) for i in range(10)])
    sim_acc = float((simulate(compiled, x_test).argmax(1) == y_test).mean())
    print(f"[2/5] compiled in {time.perf_counter() - t0:.1f} s: N={compiled.params.ring_dim}, "
          f"{compiled.depth} levels, {len(compiled.params.rotation_indices)} rotation keys; accuracy on the "
          f"10k test set: plaintext {plain_acc:.4f}, compiled program {sim_acc:.4f}")
    return compiled, {"plaintext": plain_acc, "polynomial": sim_acc}


def log_to_mlflow(compiled, accuracy: dict, artifacts: Path) -> tuple[str, str]:
    import mlflow

    from h33_bento import mlflow_flavor

    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(artifacts / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(tracking)
    experiment = "h33-serve-end-to-end"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(artifacts / "mlruns").resolve().as_uri())
    mlflow.set_experiment(experiment)
    t0 = time.perf_counter()
    with mlflow.start_run(run_name="mnist-cnn"):
        info = mlflow_flavor.log_model(compiled, name="model", registered_model_name="h33-mnist", accuracy=accuracy)
    version = info.registered_model_version
    mlflow.MlflowClient().set_registered_model_alias("h33-mnist", "prod", version)
    uri = "models:/h33-mnist@prod"
    print(f"[3/5] logged to MLflow ({tracking}) as h33-mnist v{version}, alias prod -> {uri} "
          f"({time.perf_counter() - t0:.1f} s)")
    return uri, tracking


def start_server(model_uri: str, tracking: str, artifacts: Path, port: int, api_key_hash: str):
    import httpx

    (artifacts / "api-keys.yaml").write_text(f"tenants:\n  demo:\n    - {api_key_hash}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("H33_")}
    env.update({
        "H33_MODEL_URI": model_uri,
        "MLFLOW_TRACKING_URI": tracking,
        "H33_API_KEYS_FILE": str((artifacts / "api-keys.yaml").resolve()),
        "H33_KEY_STORE": str((artifacts / "keystore").resolve()),
        "BENTOML_HOME": str((artifacts / "bentoml").resolve()),
        "BENTOML_DO_NOT_TRACK": "True",
        "H33_LANE_WAIT_MS": os.environ.get("H33_LANE_WAIT_MS", "100"),
    })
    log = open(artifacts / "server.log", "ab")
    cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", "h33_bento.runners.service:H33Inference",
           "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited ({proc.returncode}); see {artifacts / 'server.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > 300:
            stop_server(proc)
            raise SystemExit(f"the server did not start in 300 s; see {artifacts / 'server.log'}")
        time.sleep(0.5)
    print(f"[4/5] bentoml serve is up at {url} ({time.perf_counter() - t0:.1f} s), log: {artifacts / 'server.log'}")
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def round_trip(url: str, api_key: str) -> None:
    from h33_bento import FHEInferenceClient, datasets

    x_test, y_test = datasets.mnist_test()
    t0 = time.perf_counter()
    client = FHEInferenceClient(url=url, api_key=api_key)  # fetches /model, generates keys locally
    keygen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    key_id = client.upload_keys()
    upload_s = time.perf_counter() - t0
    bundle_mib = client.keys.evaluation_keys().size_bytes / 2**20
    print(f"[5/5] client: keys generated in {keygen_s:.1f} s; {bundle_mib:.0f} MiB of evaluation keys uploaded "
          f"in {upload_s:.1f} s (key_id {key_id}); the secret key never leaves this process")

    # eight single-image requests at the same time: the server packs them into one ciphertext
    images, labels = x_test[:8], y_test[:8]
    envelopes = [client.encrypt(img) for img in images]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(client.infer, envelopes))
    wall = time.perf_counter() - t0
    preds = [client.decrypt(o) for o in outs]
    runs = {o.extra.get("engine_run") for o in outs}
    print(f"\n8 concurrent single-image requests: {wall:.2f} s wall, served by {len(runs)} engine run(s)")
    print("image  true  predicted  confidence  lane  engine run")
    for i, (p, o, y) in enumerate(zip(preds, outs, labels)):
        print(f"{i:>5}  {y:>4}  {p.label:>9}  {p.confidence:>10.3f}  {o.lane:>4}  {o.extra.get('engine_run')}")
    correct = sum(p.index == y for p, y in zip(preds, labels))

    # one request carrying eight images (the client packs the lanes itself)
    images2, labels2 = x_test[8:16], y_test[8:16]
    t0 = time.perf_counter()
    preds2 = client.infer_batch(images2)
    batch_s = time.perf_counter() - t0
    correct2 = sum(p.index == y for p, y in zip(preds2, labels2))
    print(f"\none 8-image request: {batch_s:.2f} s end to end (encrypt + HTTP + run + decrypt), "
          f"engine {float(client.last_run.get('engine_ms', 'nan')):.0f} ms; predictions "
          f"{[p.label for p in preds2]}, true {labels2.tolist()}")
    print(f"\nencrypted accuracy over HTTP: {correct + correct2}/16")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", default="artifacts", type=Path)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--keep-serving", action="store_true", help="leave the server running at the end")
    args = parser.parse_args()
    args.artifacts.mkdir(parents=True, exist_ok=True)

    from h33_bento.runners.config import hash_api_key, new_api_key

    compiled, accuracy = train_and_compile(args.artifacts)
    model_uri, tracking = log_to_mlflow(compiled, accuracy, args.artifacts)
    api_key = new_api_key()
    proc, url = start_server(model_uri, tracking, args.artifacts, args.port or _free_port(), hash_api_key(api_key))
    try:
        round_trip(url, api_key)
    finally:
        if args.keep_serving:
            print(f"\nserver still running at {url} (pid {proc.pid}); API key for tenant 'demo': {api_key}")
        else:
            stop_server(proc)
            print("\nserver stopped")


if __name__ == "__main__":
    main()
