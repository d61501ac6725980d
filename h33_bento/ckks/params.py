"""CKKS parameters: validated, fingerprinted, JSON-serializable, and chosen for 128-bit security.

The parameters are the contract between client and server: both build the same OpenFHE
context from them, and every envelope and key bundle carries their fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

SecurityLevel = Literal["HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic", "HEStd_NotSet"]
#: weakest first; HEStd_NotSet promises nothing
SECURITY_ORDER: tuple[str, ...] = ("HEStd_NotSet", "HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic")
ScalingTechnique = Literal["FLEXIBLEAUTO", "FLEXIBLEAUTOEXT", "FIXEDAUTO", "FIXEDMANUAL"]
#: Secret distributions for bootstrapping: SPARSE_ENCAPSULATED bootstraps with a sparse secret
#: encapsulated under the uniform one, so the security of the uniform ternary secret holds.
SecretKeyDist = Literal["UNIFORM_TERNARY", "SPARSE_ENCAPSULATED"]

#: Largest ring dimension we plan for; 2^17 works in OpenFHE but is too slow to be useful here.
MAX_RING_DIM = 1 << 16
MIN_RING_DIM = 1 << 10
#: Bits of each special prime of hybrid key switching (OpenFHE's AUXMODSIZE).
AUX_MOD_BITS = 60


class BootstrapConfig(BaseModel):
    """CKKS bootstrapping: what the context, its precomputations and the keys are set up for.

    Each slot count a program bootstraps at needs its own setup and its own rotation keys, so
    ``slots`` lists exactly those the program uses.  What a bootstrap costs, the levels it leaves
    and its error are measured (``ckks.timing.measure_bootstrap``), never assumed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    level_budget: tuple[int, int] = (3, 3)
    secret_key_dist: SecretKeyDist = "SPARSE_ENCAPSULATED"
    slots: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "BootstrapConfig":
        if any(s < 1 or s & (s - 1) for s in self.slots):
            raise ValueError(f"bootstrap slot counts must be powers of two, got {list(self.slots)}")
        if min(self.level_budget) < 1:
            raise ValueError(f"level_budget must be positive, got {list(self.level_budget)}")
        return self

    @property
    def depth(self) -> int:
        """Levels one bootstrap consumes (OpenFHE's count for this budget and secret)."""
        import openfhe

        return int(openfhe.CryptoContext.GetBootstrapDepth(list(self.level_budget),
                                                           getattr(openfhe.SecretKeyDist, self.secret_key_dist)))


class CKKSParams(BaseModel):
    """Everything needed to rebuild the same CryptoContext on the client and the server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ring_dim: int = Field(description="polynomial ring dimension N (a power of two)")
    multiplicative_depth: int = Field(ge=1, le=60)
    scale_bits: int = Field(ge=20, le=60, description="bits of each rescaling modulus (the CKKS scale)")
    first_mod_bits: int = Field(ge=20, le=60, description="bits of the first (decryption) modulus")
    scaling_technique: ScalingTechnique = "FIXEDMANUAL"
    lanes: int = Field(default=8, ge=1, description="independent inputs interleaved in one ciphertext")
    security_level: SecurityLevel = "HEStd_128_classic"
    num_large_digits: int = Field(default=0, ge=0, description="hybrid key-switching digits (0 = OpenFHE default)")
    rotation_indices: tuple[int, ...] = Field(default=(), description="slot rotations the program needs keys for")
    bootstrapping: Optional[BootstrapConfig] = None

    @model_validator(mode="after")
    def _check(self) -> "CKKSParams":
        n = self.ring_dim
        if n & (n - 1) or not MIN_RING_DIM <= n <= (1 << 17):
            raise ValueError(f"ring_dim must be a power of two in [{MIN_RING_DIM}, 2^17], got {n}")
        if self.lanes & (self.lanes - 1) or self.lanes > self.slots:
            raise ValueError(f"lanes must be a power of two no larger than the {self.slots} slots, got {self.lanes}")
        if self.first_mod_bits < self.scale_bits:
            raise ValueError("first_mod_bits must be at least scale_bits")
        bad = [r for r in self.rotation_indices if not 0 < r < self.slots]
        if bad:
            raise ValueError(f"rotation indices must lie in (0, {self.slots}), got {bad[:5]}")
        if self.bootstrapping is not None:
            too_many = [s for s in self.bootstrapping.slots if s > self.slots]
            if too_many:
                raise ValueError(f"bootstrap slot counts {too_many} exceed the {self.slots} slots")
            if self.scaling_technique == "FIXEDMANUAL":
                raise ValueError("bootstrapping needs a FLEXIBLEAUTO-family scaling technique "
                                 "(FIXEDMANUAL bootstraps lose about two decimal digits)")
        return self

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def lane_length(self) -> int:
        """Values each lane holds: every lane sees its own cyclic vector of this length."""
        return self.slots // self.lanes

    def plaintext_bytes(self, level: int = 0) -> int:
        """Bytes of one encoded plaintext at ``level``: 8 per coefficient per tower left.  The
        engine's plaintext cache counts its budget with this, and plans predict that cache with it."""
        return self.ring_dim * 8 * (self.multiplicative_depth + 1 - min(level, self.multiplicative_depth))

    @property
    def key_switching_digits(self) -> int:
        """Digits of hybrid key switching: ``num_large_digits``, or OpenFHE's default for 0
        (``ComputeNumLargeDigits``: 3 above depth 3, else 2)."""
        if self.num_large_digits:
            return self.num_large_digits
        return 3 if self.multiplicative_depth > 3 else 2

    def estimated_key_bytes(self) -> dict[str, int]:
        """Serialized sizes (``public``, ``mult``, one ``rotation`` key, a ``ciphertext``) predicted
        from the parameters alone, for plans with nothing measured.

        A public key or a fresh ciphertext is two polynomials over Q's towers; a relinearization or
        rotation key is two per digit over Q's towers and the special primes P, which must exceed
        the widest digit: one 60-bit prime per full 60 bits of it, plus one (what OpenFHE 1.6
        chooses).  8 bytes a coefficient, plus OpenFHE's framing: within 0.3% of what it
        serializes (tests/test_ckks.py compares).
        """
        towers = [self.first_mod_bits] + [self.scale_bits] * self.multiplicative_depth
        per_digit = -(-len(towers) // self.key_switching_digits)
        digits = [sum(towers[i:i + per_digit]) for i in range(0, len(towers), per_digit)]
        special = max(digits) // AUX_MOD_BITS + 1
        poly = self.ring_dim * 8
        switching = 2 * len(digits) * poly * (len(towers) + special)
        return {"public": 2 * poly * len(towers), "mult": switching, "rotation": switching,
                "ciphertext": 2 * poly * len(towers)}

    @property
    def modulus_bits(self) -> int:
        """Bits of the ciphertext modulus Q at the top level (special primes excluded)."""
        return self.first_mod_bits + self.multiplicative_depth * self.scale_bits

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:32]

    @property
    def cost_key(self) -> str:
        """What primitive costs depend on: the fingerprint of these parameters without their
        rotations and bootstrap slot counts (which add keys, not cost per operation)."""
        boot = self.bootstrapping.model_copy(update={"slots": ()}) if self.bootstrapping else None
        return self.model_copy(update={"rotation_indices": (), "bootstrapping": boot}).fingerprint

    def summary(self) -> dict:
        """The flat fields that MLflow LoggedModel params and model cards show."""
        return {
            "ring_dim": self.ring_dim,
            "multiplicative_depth": self.multiplicative_depth,
            "scale_bits": self.scale_bits,
            "first_mod_bits": self.first_mod_bits,
            "modulus_bits": self.modulus_bits,
            "scaling_technique": self.scaling_technique,
            "security_level": self.security_level,
            "lanes": self.lanes,
            "num_rotation_keys": len(self.rotation_indices),
        }


@lru_cache(maxsize=256)
def _accepted(ring_dim: int, depth: int, scale_bits: int, first_mod_bits: int, security_level: str,
              num_large_digits: int = 0) -> bool:
    """Does OpenFHE accept this ring dimension for the modulus chain at this security level?"""
    from .context import build_context

    probe = CKKSParams(
        ring_dim=ring_dim,
        multiplicative_depth=depth,
        scale_bits=scale_bits,
        first_mod_bits=first_mod_bits,
        lanes=1,
        security_level=security_level,  # type: ignore[arg-type]
        num_large_digits=num_large_digits,
    )
    try:
        build_context(probe)
    except RuntimeError:
        return False
    return True


def check_security(params: CKKSParams, min_level: SecurityLevel = "HEStd_128_classic") -> None:
    """Refuse ``params`` below ``min_level``: by their label, and by OpenFHE's own check of the label.

    A label is only a claim (a server publishes its parameters), so a level other than
    HEStd_NotSet must also be one OpenFHE accepts for this ring dimension and modulus chain: it
    refuses to build the context otherwise.  ``min_level="HEStd_NotSet"`` is the explicit opt-out.
    Raises InsecureParametersError.
    """
    from ..errors import InsecureParametersError
    from .context import get_context

    if min_level not in SECURITY_ORDER:
        raise ValueError(f"min_level must be one of {SECURITY_ORDER}, got {min_level!r}")
    what = f"N={params.ring_dim}, log2 Q={params.modulus_bits}, security level {params.security_level}"
    if SECURITY_ORDER.index(params.security_level) < SECURITY_ORDER.index(min_level):
        raise InsecureParametersError(f"CKKS parameters ({what}) are below the required {min_level}; refusing to "
                                      "make or send keys or ciphertexts under them (pass "
                                      "min_security_level='HEStd_NotSet' to opt out explicitly)")
    if params.security_level != "HEStd_NotSet":
        try:
            get_context(params)
        except RuntimeError as exc:
            needed = re.search(r"recommendation \((\d+)\)", str(exc))
            raise InsecureParametersError(
                f"CKKS parameters ({what}) claim {params.security_level}, but OpenFHE refuses ring dimension "
                f"{params.ring_dim} at that level for this modulus chain"
                + (f" (it requires at least {needed.group(1)})" if needed else "")) from None


def max_depth(ring_dim: int, scale_bits: int = 40, first_mod_bits: int = 60,
              security_level: SecurityLevel = "HEStd_128_classic") -> int:
    """Largest multiplicative depth OpenFHE accepts at this ring dimension and security level."""
    lo, hi = 0, 60
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _accepted(ring_dim, mid, scale_bits, first_mod_bits, security_level):
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_params(
    depth: int,
    slots_needed: int,
    lanes: int = 8,
    scale_bits: int = 40,
    first_mod_bits: int = 60,
    security_level: SecurityLevel = "HEStd_128_classic",
    rotation_indices: tuple[int, ...] = (),
) -> CKKSParams:
    """Smallest ring dimension OpenFHE accepts for ``depth`` levels with ``slots_needed`` slots.

    Key switching then uses the fewest digits (``num_large_digits``) that ring accepts: larger
    digits need a larger special modulus P, which the ring's security bound must leave room for,
    but each rotation key shrinks with the digit count (at N=2^15, depth 7: 7 MiB with one digit,
    16.5 MiB with OpenFHE's default of three) at about the same rotation cost.
    Raises DepthExceededError when even the largest ring dimension cannot hold the depth.
    """
    from ..errors import DepthExceededError

    ring_dim = MIN_RING_DIM
    while ring_dim // 2 < slots_needed and ring_dim < MAX_RING_DIM:
        ring_dim *= 2
    while not _accepted(ring_dim, depth, scale_bits, first_mod_bits, security_level):
        if ring_dim >= MAX_RING_DIM:
            raise DepthExceededError(depth, max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level),
                                     MAX_RING_DIM)
        ring_dim *= 2
    digits = next((d for d in (1, 2, 3) if _accepted(ring_dim, depth, scale_bits, first_mod_bits, security_level, d)), 0)
    return CKKSParams(
        ring_dim=ring_dim,
        multiplicative_depth=depth,
        scale_bits=scale_bits,
        first_mod_bits=first_mod_bits,
        lanes=lanes,
        security_level=security_level,
        num_large_digits=digits,
        rotation_indices=tuple(sorted(set(rotation_indices))),
    )


#: Fewest levels worth bootstrapping for: below this a ring spends most of its modulus refreshing.
MIN_LEVELS_AFTER_BOOTSTRAP = 4
#: Most levels between bootstraps when the security level sets no bound (HEStd_NotSet, tests).
NOT_SET_LEVELS_AFTER_BOOTSTRAP = 8
#: Key-switching digits of bootstrappable parameters.  Fewer would shrink the keys, but OpenFHE 1.6
#: then fails to deserialize a bootstrappable context's ciphertexts once the process holds another
#: large context ("EstimateLogP() failure: expected sizeP [8]"), measured with 1 and 2 digits.
BOOTSTRAP_DIGITS = 3
#: Smallest ring bootstrapped (only rings below 2^16 with HEStd_NotSet, in tests, are this small).
MIN_BOOTSTRAP_RING = 1 << 12


def select_bootstrap_params(
    slots_needed: int,
    lanes: int = 8,
    scale_bits: int = 50,
    first_mod_bits: int = 58,
    security_level: SecurityLevel = "HEStd_128_classic",
    bootstrapping: BootstrapConfig | None = None,
) -> CKKSParams:
    """Bootstrappable parameters: the smallest ring (with ``slots_needed`` slots) whose modulus holds
    a bootstrap plus at least ``MIN_LEVELS_AFTER_BOOTSTRAP`` levels at the security level with
    ``BOOTSTRAP_DIGITS`` key-switching digits, and then the most levels it holds.

    Scale and first modulus default to 50 and 58 bits: OpenFHE's bootstrap needs their
    difference at most 8 bits, and a 45-bit scale loses a decimal digit of precision.
    FLEXIBLEAUTO scaling: FIXEDMANUAL bootstraps lose about two decimal digits.
    """
    from ..errors import DepthExceededError

    boot = bootstrapping or BootstrapConfig()
    if first_mod_bits - scale_bits > 8:
        raise ValueError(f"bootstrapping needs first_mod_bits - scale_bits <= 8, got {first_mod_bits - scale_bits}")
    needed = boot.depth + MIN_LEVELS_AFTER_BOOTSTRAP
    if security_level == "HEStd_NotSet":
        most = boot.depth + NOT_SET_LEVELS_AFTER_BOOTSTRAP
    ring_dim = max(MIN_BOOTSTRAP_RING, 1 << max(0, (2 * slots_needed - 1).bit_length()))

    def fits(ring: int, depth: int) -> bool:
        return _accepted(ring, depth, scale_bits, first_mod_bits, security_level, BOOTSTRAP_DIGITS)

    while not fits(ring_dim, needed):
        if ring_dim >= MAX_RING_DIM:
            raise DepthExceededError(needed, max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level),
                                     MAX_RING_DIM)
        ring_dim *= 2
    depth = needed
    while (security_level != "HEStd_NotSet" or depth < most) and fits(ring_dim, depth + 1):
        depth += 1
    return CKKSParams(ring_dim=ring_dim, multiplicative_depth=depth, scale_bits=scale_bits,
                      first_mod_bits=first_mod_bits, scaling_technique="FLEXIBLEAUTO", lanes=lanes,
                      security_level=security_level, num_large_digits=BOOTSTRAP_DIGITS, bootstrapping=boot)
