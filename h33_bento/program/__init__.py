"""The compiled program: the artifact the compiler writes and the engine, ``simulate`` and the
client read.  It imports only ``ckks`` (and numpy): never the compiler or the runtime.

* ``ops``          -- ``Op`` and ``OPS``, the registry of op kinds and their stage rules
* ``model``        -- ``CompiledModel`` and ``Step``: the artifact, save/load, fingerprint
* ``diagonals``    -- ``DiagonalPlan``: a linear transform's diagonals and BSGS schedule
* ``polynomials``  -- Chebyshev series as OpenFHE evaluates them
* ``cost_model``   -- ``PrimitiveCosts`` (measured) and ``CostModel`` (pricing)
* ``packing``      -- where inputs go in the lane vectors and where outputs are read
* ``report``       -- predictions and the text report
"""
from __future__ import annotations

from ..ckks.timing import PrimitiveCosts
from .cost_model import CostModel
from .diagonals import DiagonalPlan
from .model import FORMAT_VERSION, CompiledModel, Step
from .ops import OPS, Op, OpSpec
from .packing import pack, unpack

__all__ = ["CompiledModel", "CostModel", "DiagonalPlan", "FORMAT_VERSION", "OPS", "Op", "OpSpec",
           "PrimitiveCosts", "Step", "pack", "unpack"]
