"""Parameters: the CKKS parameters a graph's depth and input size need, at the requested security.

The smallest ring dimension OpenFHE accepts for the depth (``ckks.params.select_params``), then
the lane length: enough values per lane for the input and all the slots that ring offers.
Larger intermediate tensors span several ciphertext blocks rather than forcing a larger ring: a
ring twice as large makes every operation and every rotation key twice as costly, and
block-cyclic layouts keep multi-block transforms cheap.
"""
from __future__ import annotations

from ..ckks.params import MAX_RING_DIM, CKKSParams, SecurityLevel, max_depth, select_params
from ..errors import DepthExceededError
from .graph import Graph


def choose_params(graph: Graph, depth: int, lanes: int, scale_bits: int, first_mod_bits: int,
                  security_level: SecurityLevel, allow_too_deep: bool = False) -> tuple[CKKSParams, bool]:
    """(parameters, runnable).  A network deeper than the largest ring holds raises
    ``DepthExceededError``, or with ``allow_too_deep`` gets the largest ring and runnable False
    (for estimates)."""
    try:
        deepest = max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level)
        if depth > deepest:  # beyond any ring: fail fast (select_params cannot represent it)
            raise DepthExceededError(depth, deepest, MAX_RING_DIM)
        ring = select_params(depth, lanes, lanes, scale_bits, first_mod_bits, security_level).ring_dim
        size = graph.nodes[graph.input].size
        n = min(max(1 << max(0, (size - 1).bit_length()), ring // 2 // lanes, 1), (MAX_RING_DIM // 2) // lanes)
        return select_params(depth, n * lanes, lanes, scale_bits, first_mod_bits, security_level), True
    except DepthExceededError:
        if not allow_too_deep:
            raise
    largest = max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level)
    return CKKSParams(ring_dim=MAX_RING_DIM, multiplicative_depth=largest, scale_bits=scale_bits,
                      first_mod_bits=first_mod_bits, lanes=lanes, security_level=security_level), False
