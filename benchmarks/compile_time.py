#!/usr/bin/env python3
"""One default ConvNet compile in this process (costs measured, or read from this machine's cost
cache where the checkout has one), for A/B runs of two checkouts; prints one JSON line:
checkout, TAG, compile s, where the costs came from, the predicted ms and the load average.

    .venv/bin/python benchmarks/compile_time.py TAG
"""
import json, os, sys, time, torch
import h33_bento
from h33_bento import compile, datasets, zoo
torch.set_num_threads(2)
x, y = datasets.mnist_train5k()
m = zoo.train(zoo.ConvNet(), x, y, epochs=1)
l0 = os.getloadavg()[0]
t0 = time.perf_counter(); c = compile(m, (1, 28, 28), calibration_data=x[:256]); t = time.perf_counter() - t0
print(json.dumps({"code": h33_bento.__file__.split("/")[2], "tag": sys.argv[1], "compile_s": round(t, 2),
                  "costs": c.summary()["costs"], "pred_ms": c.summary()["predicted_latency_ms"],
                  "load": [round(l0, 2), round(os.getloadavg()[0], 2)]}), flush=True)
