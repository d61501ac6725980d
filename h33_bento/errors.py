"""Exception hierarchy: every failure a user can cause has its own class and a clear message."""
from __future__ import annotations


class H33Error(Exception):
    """Base class for all h33-bento errors."""


class CompileError(H33Error):
    """The model cannot be compiled (unsupported op, bad shape, ...)."""


class UnsupportedOpError(CompileError):
    """An ONNX/PyTorch op the compiler does not support."""

    def __init__(self, op_type: str, node_name: str, hint: str = "") -> None:
        msg = f"unsupported op {op_type!r} at node {node_name!r}"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)
        self.op_type = op_type
        self.node_name = node_name


class DepthExceededError(CompileError):
    """The network needs more levels than 128-bit parameters allow without bootstrapping."""

    def __init__(self, levels_needed: int, levels_available: int, ring_dim: int) -> None:
        super().__init__(
            f"the network needs {levels_needed} multiplicative levels, but 128-bit CKKS "
            f"parameters allow at most {levels_available} at ring dimension {ring_dim} "
            "without bootstrapping; use fewer or lower-degree activations, or compile with "
            "estimate_only=True for an estimate of its cost"
        )
        self.levels_needed = levels_needed
        self.levels_available = levels_available


class KeyBudgetError(CompileError):
    """No schedule the compiler finds fits the evaluation-key bundle in ``key_budget_bytes``."""

    def __init__(self, budget_bytes: int, smallest_bytes: int, fixed_bytes: int) -> None:
        super().__init__(
            f"no schedule fits the evaluation keys in the key budget of {budget_bytes / 2**20:.1f} MiB "
            f"({budget_bytes} bytes): the smallest bundle found is {smallest_bytes / 2**20:.1f} MiB "
            f"({smallest_bytes} bytes), of which {fixed_bytes / 2**20:.1f} MiB are the public, relinearization, "
            "lane-packing and bootstrapping keys no schedule changes; raise the budget, or use fewer lanes "
            "or a shallower network (a smaller ring)"
        )
        self.budget_bytes, self.smallest_bytes, self.fixed_bytes = budget_bytes, smallest_bytes, fixed_bytes


class RangeWarning(UserWarning):
    """Values left the range a polynomial activation was calibrated on, or the range a bootstrap
    needs; predictions may be wrong."""


class AccuracyWarning(UserWarning):
    """The polynomials the compiler fitted by itself change the model's predictions measurably."""


class ModelFormatError(H33Error):
    """A saved CompiledModel is missing files, has been tampered with, or is of an unknown version."""


class EnvelopeError(H33Error, ValueError):
    """Base class for problems with an encrypted envelope (ciphertext or key bundle bytes)."""


class UnsupportedVersionError(EnvelopeError):
    """The wire-format version is not one this build understands."""


class ModelMismatchError(EnvelopeError):
    """The envelope was made for another model."""


class ParamsMismatchError(EnvelopeError):
    """The envelope (or key bundle) was made for other CKKS parameters."""


class KeyMismatchError(EnvelopeError):
    """The envelope was encrypted under a key other than the one loaded."""


class EvaluationKeysNotFoundError(KeyMismatchError):
    """No evaluation keys for a key_id: no key store, or no bundle for it in the store."""

    def __init__(self, key_id: str, reason: str) -> None:
        super().__init__(f"no evaluation keys for key_id {key_id}: {reason}")
        self.key_id = key_id


class TruncatedDataError(EnvelopeError):
    """The bytes end before the header says they should."""


class TamperedDataError(EnvelopeError):
    """The bytes do not match their recorded digest."""


class WeightsNotProvisionedError(H33Error):
    """An encrypted-weight model was asked to run (or be simulated) without its weights: none were
    provisioned for this key, and a weightless artifact holds none."""


class UnknownModelError(H33Error, LookupError):
    """The server serves no model under the name asked for (``FHEInferenceClient(model="...")``)."""


class SandboxUnavailableError(H33Error):
    """No process is available to validate untrusted bytes (they fail to start, or all are busy).

    A server-side condition, not a fault of the request: retry later.
    """


class InsecureParametersError(H33Error):
    """CKKS parameters below the security level the caller requires (128-bit unless opted out).

    Raised before any key or ciphertext is made or sent under them.
    """


class InsufficientMemoryError(H33Error):
    """The plan predicts more memory for a step (key generation) than this machine or container
    has available; raised before the step starts, instead of the kernel killing the process."""

    def __init__(self, what: str, predicted: int, available: int, override: str) -> None:
        super().__init__(
            f"{what} is predicted to need {predicted / 2**30:.2f} GiB at its peak, but only "
            f"{available / 2**30:.2f} GiB more is available here (cgroup limit, MemAvailable or "
            f"H33_MEMORY_LIMIT_BYTES); use a machine "
            f"with more memory, or {override} to try anyway"
        )
        self.predicted, self.available = predicted, available
