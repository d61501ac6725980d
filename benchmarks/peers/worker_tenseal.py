"""TenSEAL (0.3.16, Microsoft SEAL) worker: one network, one process.

    benchmarks/peers/.venv-tenseal/bin/python benchmarks/peers/worker_tenseal.py \
        --network convnet --data benchmarks/peers/out/convnet --repeat 3 --json out.json

The network is evaluated as in TenSEAL's MNIST tutorial ("Encrypted convolution on MNIST"):
the client im2col-encodes the image (``ts.im2col_encoding``), the server runs one
``conv2d_im2col`` per output channel, packs the channels (``CKKSVector.pack_vectors``),
squares (``square_``) and multiplies by the plaintext weight matrices (``mm``).  BatchNorm
(LoLA) is folded into the preceding conv / linear layer.  One image per ciphertext: TenSEAL has
no lanes, so the amortized time at k inputs is k sequential requests.

LeNet-5 is not run: ``conv2d_im2col`` only evaluates a convolution whose input the client
im2col-encoded, so LeNet-5's second convolution (on an encrypted 32x14x14 activation) would have
to be a dense 6272x3136 ``mm`` at N=2^14 (thousands of rotations per image and a 20M-entry
plaintext matrix re-encoded on every call), which is impractical.
Parameters: ``common.TENSEAL_PARAMS`` (128-bit: 218 bits at N=8192).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import (TENSEAL_PARAMS, check_128, log, measure_requests, phase, timed,  # noqa: E402
                    worker_args, write_result)  # noqa: E402

UNSUPPORTED = {
    "lenet5": "TenSEAL's conv2d_im2col only evaluates a convolution on a client-side im2col-encoded image; "
              "LeNet-5's second conv on an encrypted activation would be a dense 6272x3136 mm at N=2^14 "
              "(impractical: thousands of rotations and a 20M-entry matrix per image)",
    "resnet20": "TenSEAL has no bootstrapping (its issues #410 and #480), and ResNet-20's depth fits no "
                "128-bit ring without it",
}

#: conv geometry per network (kernel, stride); padding must be 0 for im2col_encoding.
CONV = {"convnet": ("conv", 7, 3), "lola": ("conv1", 2, 2)}


def fold_bn(w: np.ndarray, b: np.ndarray, data, bn: str, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    g, beta = data[f"w/{bn}.weight"], data[f"w/{bn}.bias"]
    mean, var = data[f"w/{bn}.running_mean"], data[f"w/{bn}.running_var"]
    s = g / np.sqrt(var + eps)
    return w * s.reshape(-1, *([1] * (w.ndim - 1))), (b - mean) * s + beta


class EncNet:
    """Plaintext weights (folded) + the tutorial's encrypted forward pass."""

    def __init__(self, net: str, data) -> None:
        conv, self.k, self.stride = CONV[net]
        w, b = data[f"w/{conv}.weight"].astype(np.float64), data[f"w/{conv}.bias"].astype(np.float64)
        f1w, f1b = data["w/fc1.weight"].astype(np.float64), data["w/fc1.bias"].astype(np.float64)
        if net == "lola":
            w, b = fold_bn(w, b, data, "bn1")
            f1w, f1b = fold_bn(f1w, f1b, data, "bn2")
        self.kernels = w.reshape(w.shape[0], self.k, self.k).tolist()
        self.conv_bias = b.tolist()
        self.fc1_w, self.fc1_b = f1w.T.tolist(), f1b.tolist()
        self.fc2_w, self.fc2_b = data["w/fc2.weight"].astype(np.float64).T.tolist(), data["w/fc2.bias"].tolist()

    def forward(self, ts, enc_x, windows_nb: int):
        channels = [enc_x.conv2d_im2col(kernel, windows_nb) + bias for kernel, bias in zip(self.kernels, self.conv_bias)]
        enc_x = ts.CKKSVector.pack_vectors(channels)
        enc_x.square_()
        enc_x = enc_x.mm(self.fc1_w) + self.fc1_b
        enc_x.square_()
        return enc_x.mm(self.fc2_w) + self.fc2_b


def main() -> None:
    args = worker_args()

    if args.network in UNSUPPORTED:
        write_result(args.json, {"framework": "tenseal", "network": args.network, "status": "skipped",
                                 "reason": UNSUPPORTED[args.network]})
        return

    import tenseal as ts

    data = np.load(os.path.join(args.data, "data.npz"))
    images = data["images"][: args.images, 0].astype(np.float64)
    ref = data["ref_logits"][: args.images]
    labels = data["labels"][: args.images]
    p = TENSEAL_PARAMS[args.network]
    n = p["poly_modulus_degree"]
    check_128(n.bit_length() - 1, sum(p["coeff_mod_bit_sizes"]))
    result = {"framework": "tenseal", "network": args.network, "tenseal_version": ts.__version__,
              "params": {**p, "logQP": sum(p["coeff_mod_bit_sizes"]), "secret": "uniform ternary (SEAL)"}}
    phase(args.json, "start", params=result["params"])

    log(f"tenseal {args.network}: context + keys ...")
    phase(args.json, "key generation")
    t0 = time.perf_counter()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=n, coeff_mod_bit_sizes=p["coeff_mod_bit_sizes"])
    ctx.global_scale = 2 ** p["scale_bits"]
    ctx.generate_galois_keys()
    t_keys = time.perf_counter()
    model = EncNet(args.network, data)
    t_done = time.perf_counter()
    result.update(setup_s=t_done - t0, keygen_s=t_keys - t0, threads=os.cpu_count())
    bundle = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    result["key_bundle_bytes"] = len(bundle)
    del bundle

    def one(img: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        t_enc, (enc, windows) = timed(lambda: ts.im2col_encoding(ctx, img.tolist(), model.k, model.k, model.stride))
        t_srv, out = timed(lambda: model.forward(ts, enc, windows))
        t_dec, logits = timed(out.decrypt)
        return t_enc, t_srv, t_dec, np.asarray(logits, dtype=np.float64)[:10]

    phase(args.json, "inference")
    result.update(measure_requests(one, images[0], list(images), args.repeat, ref, labels, lanes=1))
    log(f"tenseal {args.network}: single {result['single_ms']:.0f} ms, amortized {result['amortized_ms']:.0f} ms/img, "
        f"err {result['max_abs_err']:.2e}")
    write_result(args.json, result)


if __name__ == "__main__":
    main()
