"""Output layouts: what the eager module returns, flattened to ONNX's list of outputs and rebuilt from it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from serve.errors import ExportError
from serve.tasks.base import describe_type


def flatten(output: Any) -> tuple[dict, list[torch.Tensor]]:
    """The output's layout (a JSON-able dict) and its tensors in ONNX's output order.

    Raises:
        ExportError: an output structure ONNX serving doesn't rebuild.
    """
    if isinstance(output, torch.Tensor):
        return {"kind": "tensor"}, [output]
    if isinstance(output, Mapping) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        return {"kind": "dict", "keys": [str(k) for k in output]}, list(output.values())
    if isinstance(output, (tuple, list)) and output and all(isinstance(v, torch.Tensor) for v in output):
        return {"kind": type(output).__name__, "n": len(output)}, list(output)
    if (isinstance(output, list) and output and all(isinstance(o, Mapping) for o in output)
            and all(isinstance(v, torch.Tensor) for v in output[0].values())):
        return {"kind": "per_image", "keys": [str(k) for k in output[0]]}, list(output[0].values())
    raise ExportError(
        f"the model returns {describe_type(output)}; ONNX serving rebuilds a tensor, a tuple, list or dict "
        f"of tensors, or a list of dicts of tensors (one per image)"
    )


def unflatten(layout: Mapping, tensors: list[torch.Tensor]) -> Any:
    """One run's output tensors as the structure the layout describes (per_image: one image's dict)."""
    kind = layout["kind"]
    if kind == "tensor":
        return tensors[0]
    if kind in ("dict", "per_image"):
        return dict(zip(layout["keys"], tensors))
    return tuple(tensors) if kind == "tuple" else list(tensors)


def output_names(layout: Mapping) -> list[str]:
    """The ONNX output names of a layout: output, output.<key> or output.<i>."""
    if layout["kind"] == "tensor":
        return ["output"]
    if layout["kind"] in ("dict", "per_image"):
        return [f"output.{key}" for key in layout["keys"]]
    return [f"output.{i}" for i in range(layout["n"])]
