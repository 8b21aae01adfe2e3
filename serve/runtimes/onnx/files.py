"""ONNX checkpoints served as they are: an .onnx file (external data beside it) or serialized bytes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from serve.cores import available_cores
from serve.errors import ExportError
from serve.extras import require
from serve.runtimes.onnx.export import LAYOUT_PROP
from serve.runtimes.onnx.reasons import first_line
from serve.runtimes.onnx.session import OnnxRuntime


def open_onnx_file(path: Path, device: torch.device | str = "cpu", threads: int | None = None,
                   load_threads: int | None = None) -> OnnxRuntime:
    """An .onnx file served directly; external data files must lie beside it (or below its folder).

    The file is checked here without onnxruntime (it is opened by the process that runs it): it parses,
    has one input, and every external data file it names exists inside its folder.

    Raises:
        ExportError: missing file, not ONNX, several inputs, missing or escaping external data.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, f"an ONNX checkpoint ({path})", ExportError)
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise ExportError(f"{path}: tensor '{tensor.name}' points outside its folder ({location})")
        if not target.is_file():
            raise ExportError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
    layout, input_name = _model_io(model, str(path))
    return OnnxRuntime(path, layout, device=torch.device(device), threads=threads or available_cores(),
                       load_threads=load_threads, info={"cache": "file"}, input_name=input_name)


def open_onnx_bytes(data: bytes, name: str, device: torch.device | str = "cpu", threads: int | None = None) -> OnnxRuntime:
    """A serialized ONNX model held in memory (a TorchServe archive's serialized file): no external data.

    Raises:
        ExportError: not ONNX, several inputs, or weights in external files.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, f"an ONNX model ({name})", ExportError)
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{name} is not an ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError(f"{name} keeps weights in external data files, which can't be read from here")
    layout, input_name = _model_io(model, name)
    return OnnxRuntime(data, layout, device=torch.device(device), threads=threads or available_cores(),
                       info={"cache": "file"}, input_name=input_name)


def _model_io(model, name: str) -> tuple[dict, str]:
    """An ONNX model's output layout (from our export's metadata, else by its outputs) and its one input.

    Raises:
        ExportError: not exactly one input.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{name} has {len(inputs)} inputs {inputs}; one image batch input expected")
    props = {p.key: p.value for p in model.metadata_props}
    layout = json.loads(props[LAYOUT_PROP]) if LAYOUT_PROP in props else (
        {"kind": "tensor"} if len(model.graph.output) == 1 else {"kind": "tuple", "n": len(model.graph.output)})
    return layout, inputs[0]
