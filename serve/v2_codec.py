"""The Open Inference Protocol's inference messages, transport-free: the request's inputs, outputs and
parameters parsed from its JSON header and binary data, and output tensors rendered back."""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.errors import InvalidRequestError
from serve.tasks.base import Task, V2Output

TENSOR_INPUT = "input"
IMAGE_INPUT = "image"


@dataclass(frozen=True)
class RequestedOutput:
    binary: bool
    classification: int  # top-K as "probability:index:label" strings; 0: the probabilities


def parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequestError(f"{what}: 'parameters' must be a JSON object")
    if "shared_memory_region" in params:
        raise InvalidRequestError(f"{what}: shared memory is not supported by this server")
    return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_outputs(header: dict, task: Task) -> dict[str, RequestedOutput]:
    """The outputs to answer, in order: those named, or every output of the task.

    Raises: InvalidRequestError: an unknown output, or bad output parameters.
    """
    default_binary = parameters(header, "request").get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequestError("request parameter 'binary_data_output' must be a boolean")
    names = [o["name"] for o in task.v2_outputs()]
    requested = header.get("outputs")
    if requested is None or requested == []:
        return {name: RequestedOutput(default_binary, 0) for name in names}
    if not isinstance(requested, list):
        raise InvalidRequestError("'outputs' must be a list")
    outputs: dict[str, RequestedOutput] = {}
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequestError("each requested output must be an object with a 'name'")
        name = entry["name"]
        if name not in names:
            shown = f"'{names[0]}'" if len(names) == 1 else names
            raise InvalidRequestError(f"unexpected inference output '{name[:64]}'; the output{'s are' if len(names) > 1 else ' is'} {shown}")
        if name in outputs:
            raise InvalidRequestError(f"output '{name}' is requested twice")
        params = parameters(entry, f"output '{name}'")
        binary = params.get("binary_data", default_binary)
        classification = params.get("classification", 0)
        if not isinstance(binary, bool):
            raise InvalidRequestError(f"output '{name}': 'binary_data' must be a boolean")
        if not _is_int(classification) or classification < 0:
            raise InvalidRequestError(f"output '{name}': 'classification' must be a non-negative integer")
        if classification and not task.v2_classification:
            raise InvalidRequestError(f"output '{name}': the 'classification' parameter applies to class scores only "
                                      f"(not to task '{task.name}')")
        outputs[name] = RequestedOutput(binary, classification)
    return outputs


def _expected(task: Task) -> tuple[tuple[str, ...], str]:
    """The inputs a task accepts, and how to name them in a message."""
    channels, height, width = task.input_shape
    accepted = (TENSOR_INPUT, IMAGE_INPUT) if task.fixed_size else (IMAGE_INPUT,)
    expected = (f"'{TENSOR_INPUT}' (FP32 [N, {channels}, {height}, {width}]) or " if TENSOR_INPUT in accepted else ""
                ) + f"'{IMAGE_INPUT}' (BYTES [N], encoded images)"
    return accepted, expected


def check_input_count(count: int, task: Task) -> None:
    """Raises: InvalidRequestError: not exactly one input."""
    _, expected = _expected(task)
    if count == 0:
        raise InvalidRequestError(f"'inputs' must be a non-empty list holding {expected}")
    if count != 1:
        raise InvalidRequestError(f"expected exactly one input, {expected}; got {count}")


def _check_name_and_shape(name: str, shape: Any, task: Task, model: str) -> None:
    accepted, expected = _expected(task)
    if name not in accepted:
        raise InvalidRequestError(
            f"unexpected inference input '{name[:64]}' for model '{model}'; send {expected}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidRequestError(f"input '{name}': 'shape' must be a list of non-negative integers")


def parse_input(header: dict, binary: bytes, task: Task, model: str, max_images: int) -> tuple[str, Any]:
    """Return ("input", float32 array [N, C, H, W]) or ("image", [image bytes, ...]).

    Raises:
        InvalidRequestError: not exactly one known input, or its datatype, shape or data is wrong.
    """
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        check_input_count(0, task)
    check_input_count(len(inputs), task)
    tensor = inputs[0]
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise InvalidRequestError("each input must be an object with a 'name'")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    _check_name_and_shape(name, shape, task, model)
    params = parameters(tensor, f"input '{name}'")
    raw = None
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not _is_int(size) or not 0 <= size <= len(binary):
            raise InvalidRequestError(
                f"input '{name}': binary_data_size {size!r} does not fit the {len(binary)} bytes after the JSON"
            )
        if "data" in tensor:
            raise InvalidRequestError(f"input '{name}' has both 'data' and binary_data_size")
        raw, binary = binary[:size], binary[size:]
    elif "data" not in tensor:
        raise InvalidRequestError(f"input '{name}' has no 'data' and no binary_data_size")
    if binary:
        raise InvalidRequestError(f"{len(binary)} bytes of binary data after the inputs are not claimed by any input")
    return parse_tensor(name, datatype, shape, task, model, max_images, data=tensor.get("data"), raw=raw)


def parse_tensor(name: str, datatype: Any, shape: Any, task: Task, model: str, max_images: int, *,
                 data: Any = None, raw: bytes | None = None, elements: list[bytes] | None = None) -> tuple[str, Any]:
    """One input already separated from its request (gRPC's InferInputTensor, or V2 JSON's after its
    binary part is cut): its data as JSON `data`, `raw` bytes (FP32 little-endian, or BYTES elements
    each with a 4-byte length) or BYTES `elements` (gRPC's bytes_contents). Returns what parse_input does.

    Raises:
        InvalidRequestError: an unknown input, or its datatype, shape or data is wrong.
    """
    _check_name_and_shape(name, shape, task, model)
    channels, height, width = task.input_shape
    wanted = "FP32" if name == TENSOR_INPUT else "BYTES"
    if datatype != wanted:
        raise InvalidRequestError(
            f"input '{name}' has datatype {str(datatype)[:20]}; expected {wanted}"
        )
    if name == TENSOR_INPUT:
        if len(shape) != 4 or tuple(shape[1:]) != (channels, height, width):
            raise InvalidRequestError(
                f"input '{name}' has shape {shape}; expected [N, {channels}, {height}, {width}]"
            )
    elif len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidRequestError(f"input '{name}' has shape {shape}; expected [N] or [N, 1], one image per element")
    count = shape[0]
    if count < 1:
        raise InvalidRequestError(f"input '{name}' holds no image (shape {shape})")
    if count > max_images:
        raise InvalidRequestError(f"{count} images in one request; the limit is {max_images}")
    if name == TENSOR_INPUT:
        return name, float_tensor(name, shape, data, raw)
    if elements is not None:
        if len(elements) != count:
            raise InvalidRequestError(f"input '{name}': {len(elements)} elements; its shape says {count}")
        return name, list(elements)
    return name, image_elements(name, count, data, raw)


def float_tensor(name: str, shape: list[int], data: Any, raw: bytes | None) -> np.ndarray:
    """The FP32 input as a writable float32 array of `shape`, from JSON numbers or raw little-endian bytes."""
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidRequestError(
                f"input '{name}': {len(raw)} bytes of binary data; shape {shape} of FP32 needs {count * 4}"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    if not isinstance(data, list):
        raise InvalidRequestError(f"input '{name}': 'data' must be a list of numbers")
    try:
        array = np.asarray(data)
    except (ValueError, RecursionError):
        raise InvalidRequestError(f"input '{name}': 'data' is a ragged nested list") from None
    if array.size and array.dtype.kind not in "iuf":
        raise InvalidRequestError(f"input '{name}': 'data' must hold numbers only")
    if array.size != count:
        raise InvalidRequestError(f"input '{name}': {array.size} values in 'data'; shape {shape} needs {count}")
    return array.astype(np.float32).reshape(shape)


def image_elements(name: str, count: int, data: Any, raw: bytes | None) -> list[bytes]:
    """The BYTES input's elements: length-prefixed binary, or base64 strings in JSON (flat or [[...], ...])."""
    if raw is not None:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidRequestError(f"input '{name}': a BYTES element's 4-byte length is cut short")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidRequestError(f"input '{name}': a BYTES element of {length} bytes runs past the data")
            elements.append(bytes(raw[offset:offset + length]))
            offset += length
            if len(elements) > count:
                break  # more than the shape says: refused below, without reading the rest
    else:
        if not isinstance(data, list):
            raise InvalidRequestError(f"input '{name}': 'data' must be a list of base64 strings")
        flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
        if len(flat) != count:
            raise InvalidRequestError(f"input '{name}': {len(flat)} elements; its shape says {count}")
        elements = []
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidRequestError(f"input '{name}': element {i + 1} is not a base64 string")
            try:
                elements.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidRequestError(
                    f"input '{name}': element {i + 1} is not valid base64 (JSON BYTES elements are base64-encoded images)"
                ) from None
    if len(elements) != count:
        shown = f"more than {count}" if len(elements) > count else str(len(elements))
        raise InvalidRequestError(f"input '{name}': {shown} elements; its shape says {count}")
    return elements


def render_output(tensor: V2Output, binary: bool) -> tuple[dict, Any]:
    """Return the output tensor's JSON description and its data: a JSON list, or bytes when binary."""
    description = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    if tensor.datatype == "BYTES":
        if not binary:
            return description, list(tensor.data)
        encoded = [e.encode() for e in tensor.data]
        return description, b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    array = np.ascontiguousarray(tensor.data)
    if binary:
        return description, array.astype(array.dtype.newbyteorder("<")).tobytes()
    return description, array.ravel().tolist()


def encode_response(header: Mapping[str, Any], tensors: list[V2Output], outputs: Mapping[str, RequestedOutput]
                    ) -> tuple[bytes, int | None]:
    """The answer's bytes: `header` (model_name, model_version, id) with the requested outputs, in
    order; and the JSON part's length when binary output data follows it (None: all JSON)."""
    by_name = {t.name: t for t in tensors}
    response: dict[str, Any] = {**header, "outputs": []}
    chunks = []
    for out_name, out in outputs.items():
        tensor, data = render_output(by_name[out_name], out.binary)
        if out.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = data
        response["outputs"].append(tensor)
    head = json.dumps(response, separators=(",", ":")).encode()
    return head + b"".join(chunks), (len(head) if chunks else None)


def raw_outputs(tensors: list[V2Output], outputs: Mapping[str, RequestedOutput]) -> list[tuple[dict, bytes]]:
    """The requested outputs, in order, each as its description (name, datatype, shape) and its raw
    little-endian bytes (BYTES: a 4-byte length before each element), as gRPC's raw_output_contents."""
    by_name = {t.name: t for t in tensors}
    return [render_output(by_name[out_name], True) for out_name in outputs]
