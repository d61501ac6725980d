"""PyTorch import: export the module to ONNX in memory, then lower it like any ONNX model.

Going through ONNX keeps one lowering path to maintain.  ``torch`` is imported lazily so the
runtime (which never sees a torch module) does not need it installed.
"""
from __future__ import annotations

import io
import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .graph import Graph
from .onnx_import import import_onnx

if TYPE_CHECKING:
    import torch

#: The legacy exporter's graphs are simpler (fewer shape-plumbing ops); the dynamo exporter
#: needs opset 18 or newer.
_LEGACY_OPSET = 17
_DYNAMO_OPSET = 18


def export_onnx(module: "torch.nn.Module", input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export ``module`` in eval mode for a (1, *input_shape) float32 input, silencing the exporters.

    The TorchScript exporter is tried first; the dynamo exporter is the fallback where the
    former is unavailable or fails.  The module's training flag is restored afterwards.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("importing a PyTorch module needs torch: pip install 'h33-bento[torch]'") from exc
    example = (torch.zeros((1, *input_shape), dtype=torch.float32),)
    was_training = module.training
    onnx_logger = logging.getLogger("torch.onnx")
    log_level = onnx_logger.level
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            onnx_logger.setLevel(logging.ERROR)
            try:
                buffer = io.BytesIO()
                torch.onnx.export(module, example, buffer, dynamo=False, opset_version=_LEGACY_OPSET)
                return onnx.load_from_string(buffer.getvalue())
            except Exception:  # noqa: BLE001 - removed or failing legacy exporter: try dynamo
                program = torch.onnx.export(
                    module, example, dynamo=True, opset_version=_DYNAMO_OPSET, verbose=False
                )
                return program.model_proto
    finally:
        onnx_logger.setLevel(log_level)
        module.train(was_training)


def predict(module: "torch.nn.Module", x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The module's own outputs (eval mode, float32) on ``x``, flattened per input: the reference the
    compiled program's predictions are compared with.  The module's training flag is restored."""
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # polynomial modules' RangeWarning: compile checks ranges itself
            outs = [module(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).double().numpy()
                    for i in range(0, len(x), batch_size)]
    finally:
        module.train(was_training)
    return np.concatenate(outs).reshape(len(x), -1)


def import_torch(module: "torch.nn.Module", input_shape: tuple[int, ...], dtype: Any = np.float64) -> Graph:
    """Lower a PyTorch module taking a (batch, *input_shape) tensor to a Graph."""
    return import_onnx(export_onnx(module, input_shape), tuple(input_shape), dtype)
