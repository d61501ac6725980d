"""OpenFHE CryptoContexts built from CKKSParams, one per parameter set per process.

OpenFHE deduplicates contexts with equal parameters internally, and its evaluation keys live in
static maps keyed by the secret key's tag, so one context serves every tenant with these params.
Those maps cannot drop one tag's keys: :func:`release_evaluation_keys` empties them all
(:func:`release_rotation_keys` the rotation keys only).
Bootstrapping needs a setup per slot count: with its precomputations (gigabytes at N=2^16) on
the server (``bootstrap_context``), without them everywhere else.  Every bootstrappable context
is set up at least without them (a millisecond): OpenFHE serializes keys and ciphertexts of a
set-up context with 33 more bytes, and the sandbox compares bytes across processes.
"""
from __future__ import annotations

import ctypes
import os
import threading

import openfhe

from .params import CKKSParams

_lock = threading.Lock()
_contexts: dict[str, openfhe.CryptoContext] = {}
_bootstrap_setups: set[tuple[str, int, bool]] = set()


def build_context(params: CKKSParams) -> openfhe.CryptoContext:
    """A fresh context for ``params`` (raises RuntimeError when OpenFHE rejects them)."""
    p = openfhe.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.multiplicative_depth)
    p.SetScalingModSize(params.scale_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetSecurityLevel(getattr(openfhe, params.security_level))
    p.SetScalingTechnique(getattr(openfhe, params.scaling_technique))
    p.SetRingDim(params.ring_dim)
    p.SetBatchSize(params.slots)
    if params.num_large_digits:
        p.SetNumLargeDigits(params.num_large_digits)
    features = [openfhe.PKE, openfhe.KEYSWITCH, openfhe.LEVELEDSHE, openfhe.ADVANCEDSHE]
    if params.bootstrapping is not None:
        p.SetSecretKeyDist(getattr(openfhe.SecretKeyDist, params.bootstrapping.secret_key_dist))
        features.append(openfhe.FHE)
    cc = openfhe.GenCryptoContext(p)
    for feature in features:
        cc.Enable(feature)
    if cc.GetRingDimension() != params.ring_dim:
        raise RuntimeError(f"OpenFHE chose ring dimension {cc.GetRingDimension()}, not {params.ring_dim}")
    return cc


def get_context(params: CKKSParams) -> openfhe.CryptoContext:
    """The shared context for ``params`` in this process."""
    key = params.fingerprint
    with _lock:
        cc = _contexts.get(key)
        if cc is None:
            cc = build_context(params)
            if params.bootstrapping is not None:
                _setup_bootstrap(cc, params, precompute=False)
            _contexts[key] = cc
        return cc


def _setup_bootstrap(cc: openfhe.CryptoContext, params: CKKSParams, precompute: bool) -> None:
    """Set ``cc`` up to bootstrap at every slot count of ``params`` (the caller holds ``_lock``)."""
    for slots in params.bootstrapping.slots:
        enough = {(params.fingerprint, slots, True)} if precompute else {(params.fingerprint, slots, flag)
                                                                          for flag in (True, False)}
        if enough & _bootstrap_setups:
            continue
        cc.EvalBootstrapSetup(list(params.bootstrapping.level_budget), [0, 0], slots, 0, precompute)
        _bootstrap_setups.add((params.fingerprint, slots, precompute))


def release_evaluation_keys() -> None:
    """Drop every evaluation key this process holds and give the memory back to the OS.

    OpenFHE's Python binding can only clear its key maps whole.  Clearing them frees the keys, but
    glibc keeps the freed pages in its heap; ``malloc_trim`` returns them (measured: RSS falls back
    to where it was before the keys were loaded).  Nothing may use the keys meanwhile.
    """
    openfhe.ClearEvalMultKeys()
    release_rotation_keys()


def release_rotation_keys() -> None:
    """Drop every rotation (and bootstrapping) key this process holds, relinearization keys kept,
    and trim the heap as :func:`release_evaluation_keys` does: what streamed key generation does
    between chunks."""
    openfhe.CryptoContext.ClearEvalAutomorphismKeys()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; absent elsewhere
    if trim is not None:
        trim(0)


def rss_bytes() -> int:
    """This process's resident set size now (Linux; 0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; 0 where /proc is not available).  Unlike
    ``ru_maxrss``, which Linux carries over from the parent through fork and exec, it counts only
    what this program touched."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def bootstrap_context(params: CKKSParams, precompute: bool) -> openfhe.CryptoContext:
    """The shared context, set up to bootstrap at every slot count of ``params.bootstrapping``.

    ``precompute=False`` (what :func:`get_context` does already) is enough to generate
    bootstrapping keys; running ``EvalBootstrap`` needs the precomputations (OpenFHE crashes
    without them), which a server sets up once.
    """
    if params.bootstrapping is None:
        raise ValueError("these CKKS parameters have no bootstrapping configuration")
    cc = get_context(params)
    with _lock:
        _setup_bootstrap(cc, params, precompute)
    return cc
