"""Export: a module to ONNX bytes with torch.onnx.export (TorchScript exporter first, dynamo when it fails)."""
from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from serve.errors import ExportError
from serve.runtimes.onnx.layout import output_names

OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
INPUT_NAME = "input"
# metadata_props an export carries: its cache key, its output layout, the exporter that made it
KEY_PROP = "torch_serve.key"
LAYOUT_PROP = "torch_serve.layout"
EXPORTER_PROP = "torch_serve.exporter"


def export_onnx(module: nn.Module, sample: torch.Tensor, layout: Mapping, *, dynamic_hw: bool = False,
                exporter: str = "auto") -> tuple[bytes, str, list[str]]:
    """Export module to ONNX bytes for inputs shaped like sample; return them, the exporter used and the
    tracer's warnings (the TorchScript exporter warns where it baked in a value).

    The batch axis is dynamic; height and width too with dynamic_hw. A per_image layout (torchvision
    detection: a list of dicts) is exported for one image [C, H, W] of any size. exporter "auto" tries
    EXPORTERS in order.

    Raises:
        ExportError: every exporter tried failed; names each one's reason.
    """
    per_image = layout["kind"] == "per_image"
    if per_image:  # detection: a list with one image [C, H, W], of any height and width
        args: tuple = ([sample[0]],)
        input_axes = {1: "height", 2: "width"}
    else:  # a batch of 2: the dynamo exporter specializes a batch of 1 into a constant
        args = (torch.cat([sample[:1], sample[:1]]),)
        input_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    names = output_names(layout)
    reasons = []
    for name in EXPORTERS if exporter == "auto" else (exporter,):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                data = (_export_torchscript if name == "torchscript" else _export_dynamo)(
                    module, args, names, input_axes, per_image)
            traced = [str(w.message).strip().splitlines()[0] for w in caught
                      if issubclass(w.category, torch.jit.TracerWarning)]
            return data, name, traced
        except Exception as exc:  # any exporter failure is a reason to report, never a crash
            reasons.append(f"{name} exporter: {_export_reason(exc)}")
    raise ExportError("ONNX export failed: " + "; ".join(reasons))


def _export_torchscript(module, args, names, input_axes, per_image) -> bytes:
    output_axes = {n: {0: "detections" if per_image else "batch"} for n in names}
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                      output_names=names, dynamic_axes={INPUT_NAME: input_axes, **output_axes})
    return buffer.getvalue()


def _export_dynamo(module, args, names, input_axes, per_image) -> bytes:
    dims = {axis: torch.export.Dim.DYNAMIC for axis in input_axes}
    shapes = ([dims],) if per_image else (dims,)
    program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                output_names=names, dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


def _export_reason(exc: BaseException) -> str:
    """One line out of an exporter's exception: the dynamo exporter's 'Exception summary', else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = re.search(r"## Exception summary\s*\n(.+)", text)
    if summary:
        line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", summary.group(1).strip())
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        line = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return line[:400]


def with_metadata(data: bytes, props: Mapping[str, str]) -> bytes:
    """The serialized model with props set in its metadata_props (replacing entries of the same key)."""
    import onnx

    model = onnx.load_from_string(data)
    for entry in list(model.metadata_props):
        if entry.key in props:
            model.metadata_props.remove(entry)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()
