"""Linear transforms as generalized diagonals with a baby-step giant-step (BSGS) schedule.

Each lane holds a cyclic vector of length ``n``; a tensor larger than ``n`` spans several
ciphertexts ("blocks") and its matrix is treated blockwise.  For output block o the program is

    t_o = sum_g rot( sum_{i,b} rot(d_{o,i,g+b}, -g) * rot(x_i, b), g )

with the baby rotations rot(x_i, b) hoisted (one ``EvalFastRotationPrecompute`` per input
block) and shared by every output block.  With ``fold = M`` the output is gathered modulo M
instead of modulo n: only M diagonals are needed however wide the input, followed by
log2(n/M) rotate-and-add steps (hoisted in chunks), and the result repeats with period M.

Giant-step rotations of one output block are hoisted too: each partial sum is rotated with
``EvalFastRotationExt``, the rotated copies are summed in the extended basis P*Q, and one
``KeySwitchDown`` brings the sum back, instead of one ModDown per giant step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from .cost_model import CostModel

#: Most fold steps one hoisted chunk may combine: a chunk of c steps needs 2^c - 1 rotation keys.
MAX_FOLD_CHUNK = 3


@dataclass
class DiagonalPlan:
    """Diagonals of one linear transform under fixed input/output layouts, and their schedule."""

    n: int
    in_blocks: int
    out_blocks: int
    fold: int
    terms: np.ndarray  # (T, 3) int64 rows: out_block, in_block, k
    diags: np.ndarray  # (T, n) float64, or shape (T, 0) when only counting
    bias: np.ndarray  # (out_blocks, n) float64
    baby_step: int = 1
    fold_chunk: int = 1

    @property
    def fold_steps(self) -> list[int]:
        """Rotations (per-lane units) of the rotate-and-add fold; empty without fold."""
        if not self.fold:
            return []
        steps, s = [], self.fold
        while s < self.n:
            steps.append(s)
            s *= 2
        return steps

    def fold_chunks(self, fold_chunk: int | None = None) -> list[list[int]]:
        """The fold as hoisted chunks: each lists the rotations summed onto one ciphertext.

        A chunk of c consecutive steps starting at f adds rot(x, j*f) for j = 1 .. 2^c - 1, all
        from one digit decomposition; c = 1 is a plain rotate-and-add.
        """
        c = fold_chunk or self.fold_chunk
        steps = self.fold_steps
        return [[j * steps[i] for j in range(1, 1 << len(steps[i:i + c]))] for i in range(0, len(steps), c)]

    def schedule(self, baby_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Baby and giant rotation (per-lane units) of every term: k = giant + baby.

        Diagonal indices are taken in (-n/2, n/2] so that a window of taps around zero (a
        convolution's negative offsets) splits as neatly as the positive ones.
        """
        n1 = baby_step or self.baby_step
        ks = self.terms[:, 2]
        signed = np.where(ks > self.n // 2, ks - self.n, ks)
        baby = signed % n1
        return baby, signed - baby

    def partial_sums(self) -> int:
        """Distinct (output block, giant step) sums: what is rotated, so relinearized once each
        when the diagonals are ciphertexts."""
        _, g = self.schedule()
        return int(len(np.unique(self.terms[:, 0] * self.n + g % self.n)))

    def without_values(self) -> "DiagonalPlan":
        """The same plan with no diagonal or bias values: the structure an encrypted-weight server runs."""
        return replace(self, diags=np.zeros((len(self.terms), 0)), bias=np.zeros((self.out_blocks, 0)))

    def _bsgs_counts(self, baby_step: int | None) -> dict[str, int]:
        ob, ib = self.terms[:, 0], self.terms[:, 1]
        b, g = self.schedule(baby_step)
        g = g % self.n
        baby_pairs = np.unique(ib[b != 0] * self.n + b[b != 0])
        giant_pairs = np.unique(ob[g != 0] * self.n + g[g != 0])
        per_block = np.bincount(giant_pairs // self.n, minlength=self.out_blocks)
        hoisted = per_block[per_block >= 2]  # summed in the extended basis, one ModDown per block
        return {
            "precompute": int(len(np.unique(baby_pairs // self.n))) + int(hoisted.sum()),
            "fast_rotate": int(len(baby_pairs)),
            "rotate": int((per_block == 1).sum()),
            "rotate_ext": int(hoisted.sum()),
            "add_ext": int((hoisted - 1).sum()),
            "key_switch_down": int(len(hoisted)),
            "mult_plain": int(len(self.terms)),
            "add": int(len(self.terms)),
            "rescale": self.out_blocks,
        }

    def _fold_counts(self, fold_chunk: int | None) -> dict[str, int]:
        counts = dict.fromkeys(("rotate", "precompute", "rotate_ext", "add_ext", "key_switch_down", "add"), 0)
        for chunk in self.fold_chunks(fold_chunk):
            counts["add"] += self.out_blocks
            if len(chunk) == 1:
                counts["rotate"] += self.out_blocks
            else:
                counts["precompute"] += self.out_blocks
                counts["rotate_ext"] += len(chunk) * self.out_blocks
                counts["add_ext"] += (len(chunk) - 1) * self.out_blocks
                counts["key_switch_down"] += self.out_blocks
        return counts

    def counts(self, baby_step: int | None = None, fold_chunk: int | None = None) -> dict[str, int]:
        """Primitive operations the engine runs for this schedule: what costs and reports use."""
        counts = self._bsgs_counts(baby_step)
        for name, v in self._fold_counts(fold_chunk).items():
            counts[name] = counts.get(name, 0) + v
        counts["diagonals"] = int(len(self.terms))
        return counts

    def rotations(self, baby_step: int | None = None, fold_chunk: int | None = None) -> set[int]:
        """Per-lane rotation amounts (mod n) this transform needs keys for (under its schedule, or
        the one given)."""
        b, g = self.schedule(baby_step)
        folds = {r % self.n for chunk in self.fold_chunks(fold_chunk) for r in chunk}
        return (set((b % self.n).tolist()) | set((g % self.n).tolist()) | folds) - {0}

    def baby_steps(self) -> list[int]:
        """The BSGS splits worth considering: every n1 up to 64 and every power of two up to the
        widest diagonal, and ``n`` (every rotation a hoisted baby)."""
        ks = np.abs(np.where(self.terms[:, 2] > self.n // 2, self.terms[:, 2] - self.n, self.terms[:, 2]))
        candidates = sorted(set(range(1, min(self.n, 64) + 1)) | {1 << p for p in range(int(np.log2(self.n)) + 1)})
        widest = int(ks.max(initial=0)) + 1
        return [c for c in candidates if c <= widest] + [self.n]

    def fold_chunk_sizes(self) -> range:
        """The fold chunkings worth considering (1 without a fold)."""
        return range(1, min(MAX_FOLD_CHUNK, max(len(self.fold_steps), 1)) + 1)

    def bsgs_ms(self, model: CostModel, level: int, baby_step: int) -> float:
        """Predicted time of the products and baby/giant rotations with split ``baby_step``."""
        return model.total(self._bsgs_counts(baby_step), level)

    def fold_ms(self, model: CostModel, level: int, fold_chunk: int) -> float:
        """Predicted time of the fold with chunks of ``fold_chunk`` steps."""
        return model.total(self._fold_counts(fold_chunk), level)

    def choose_schedule(self, model: CostModel, level: int) -> None:
        """Pick the BSGS split and the fold chunking that cost least at ``level``."""
        self.baby_step = min(self.baby_steps(), key=lambda n1: self.bsgs_ms(model, level, n1))
        self.fold_chunk = min(self.fold_chunk_sizes(), key=lambda c: (self.fold_ms(model, level, c), c))

    def cost(self, model: CostModel, level: int) -> float:
        return model.total(self.counts(), level)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The transform in plaintext on lane vectors (B, in_blocks, n) -> (B, out_blocks, n), exactly
        the sums the engine computes (rotations are ``np.roll``)."""
        out = np.zeros((x.shape[0], self.out_blocks, self.n))
        for t, (ob, ib, k) in enumerate(self.terms.tolist()):
            out[:, ob] += self.diags[t] * np.roll(x[:, ib], -k, axis=-1)
        for f in self.fold_steps:
            out += np.roll(out, -f, axis=-1)
        return out + self.bias


def lane_shifts(lanes: int, slots: int) -> tuple[int, ...]:
    """The slot rotations the server packs single requests into one ciphertext with: a move by
    every power of two below ``lanes`` (``Engine.pack_lanes`` composes the others)."""
    return tuple(sorted(slots - (1 << b) for b in range(max(lanes - 1, 0).bit_length())))


def rotation_indices(plans: Iterable[DiagonalPlan], lanes: int, slots: int) -> tuple[int, ...]:
    """The slot rotations a program needs keys for: every rotation its plans use (per-lane amounts
    scaled by the lanes; never a lane shift, which moves by less than a lane), plus the lane shifts."""
    rotations = {(r * lanes) % slots for plan in plans for r in plan.rotations()}
    return tuple(sorted(rotations | set(lane_shifts(lanes, slots))))
