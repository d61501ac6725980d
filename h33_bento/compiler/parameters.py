"""Parameters: the CKKS parameters a graph's depth and input size need, at the requested security.

The smallest ring dimension OpenFHE accepts for the depth (``ckks.params.select_params``), then
the lane length: enough values per lane for the input and all the slots that ring offers.
Larger intermediate tensors span several ciphertext blocks rather than forcing a larger ring: a
ring twice as large makes every operation and every rotation key twice as costly, and
block-cyclic layouts keep multi-block transforms cheap.

A network deeper than the largest ring holds gets bootstrappable parameters instead
(``ckks.params.select_bootstrap_params``); the ``bootstraps`` pass then places the bootstraps.
"""
from __future__ import annotations

from ..ckks.params import (MAX_RING_DIM, CKKSParams, SecurityLevel, max_depth, select_bootstrap_params,
                           select_params)
from ..errors import DepthExceededError
from .graph import Graph


def _lane_length(graph: Graph, lanes: int, ring: int) -> int:
    size = graph.nodes[graph.input].size
    return min(max(1 << max(0, (size - 1).bit_length()), ring // 2 // lanes, 1), (MAX_RING_DIM // 2) // lanes)


def choose_params(graph: Graph, depth: int, lanes: int, scale_bits: int, first_mod_bits: int,
                  security_level: SecurityLevel, bootstrapping: bool | None = None,
                  allow_too_deep: bool = False) -> tuple[CKKSParams, bool]:
    """(parameters, runnable).

    ``bootstrapping`` None bootstraps only when ``depth`` exceeds what the largest ring holds,
    True always, False never.  A network too deep without bootstrapping raises
    ``DepthExceededError``, or with ``allow_too_deep`` gets the largest ring and runnable False
    (an estimate).
    """
    deepest = max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level)
    if bootstrapping or (bootstrapping is None and depth > deepest):
        params = select_bootstrap_params(lanes, lanes, security_level=security_level)
        n = _lane_length(graph, lanes, params.ring_dim)
        return select_bootstrap_params(n * lanes, lanes, security_level=security_level), True
    try:
        if depth > deepest:  # beyond any ring: fail fast (select_params cannot represent it)
            raise DepthExceededError(depth, deepest, MAX_RING_DIM)
        ring = select_params(depth, lanes, lanes, scale_bits, first_mod_bits, security_level).ring_dim
        n = _lane_length(graph, lanes, ring)
        return select_params(depth, n * lanes, lanes, scale_bits, first_mod_bits, security_level), True
    except DepthExceededError:
        if not allow_too_deep:
            raise
    return CKKSParams(ring_dim=MAX_RING_DIM, multiplicative_depth=deepest, scale_bits=scale_bits,
                      first_mod_bits=first_mod_bits, lanes=lanes, security_level=security_level), False
