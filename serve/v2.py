"""Open Inference Protocol (KServe V2, Triton's HTTP/REST API) under /v2, as a Blueprint: `app.register_blueprint(v2)`.

Routes (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/):

    GET  /v2/health/live                               200 {"live": true}
    GET  /v2/health/ready                              200 {"ready": true}; 503 {"ready": false} while loading
    GET  /v2                                           {"name", "version", "extensions"}
    GET  /v2/models/<name>[/versions/<v>]              {"name", "versions", "platform", "inputs", "outputs"}
    GET  /v2/models/<name>[/versions/<v>]/ready        200 {"name", "ready": true}; 503 when not warm
    POST /v2/models/<name>[/versions/<v>]/infer        inference, below

A model's versions are those configured (`versions:`, "1" for a model without) and those loaded
through the management API; a path without /versions/<v> means the default version. The answer
names its version in "model_version" and in the header X-Model-Version ("<version> <sha256[:12]>").
The request parameter "timeout" (microseconds, as tritonclient's infer(timeout=...) sends it) is
the request's deadline: 503 at once when the predicted wait is longer, 503 when it passes queued.
Its metadata declares two inputs; a request sends exactly one of them:

- `input`: FP32 [N, C, H, W], already preprocessed (resized, cropped, normalised as the model
  expects): it goes straight into the model. As JSON `data` (flat row-major or nested) or binary.
- `image`: BYTES [N] (or [N, 1]), one encoded image file (JPEG, PNG, ...) per element, decoded and
  transformed by the model's configured preprocessing, exactly as POST /predictions does. Binary
  elements are Triton's 4-byte little-endian length + bytes; JSON elements are base64 strings (JSON
  can't carry raw bytes, and tritonclient's JSON mode sends BYTES as UTF-8 text, so a client sends
  base64.b64encode(image) as the element).

One output, `probabilities`: FP32 [N, classes], the softmax of the model's scores. With the
classification extension (output parameter `"classification": K`, tritonclient's class_count=K) it
is BYTES [N, K] instead, each element "probability:index:label" as Triton formats it (probability
with 6 decimals, `:label` left out when the model has no labels), best first; K above the class
count answers every class.

Binary tensor data extension: an input with parameters.binary_data_size takes its bytes from after
the JSON header, whose length is the Inference-Header-Content-Length header. An output is binary
when its parameters.binary_data is true, or, without that, when the request's
parameters.binary_data_output is true (tritonclient sets it when no outputs are named); the answer
then carries Inference-Header-Content-Length and the raw little-endian data after the JSON.
Request bodies compressed with Content-Encoding gzip or deflate are accepted (bounded by the body
limit after decompression); answers are not compressed.

Errors are {"error": "message"}: 400 for a bad request, 404 for an unknown model, version or route,
405 for a wrong method, 413 for a body or image over the limits, 503 (with Retry-After) when a model
is not warm, the queue is full, or no answer came within request_timeout_s. More than
max_images_per_request images in one request is a 400 here.

Decoding runs on the request thread as in /predictions; every piece of torch compute (the FP32
forward included) runs on the registry's batcher thread.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)

from serve.errors import (
    InvalidRequestError,
    ServeError,
    UnsupportedMediaTypeError,
    finish_http_error,
    finish_serve_error,
    note_error_code,
)
from serve.admission import TIMEOUT_HEADER, header_timeout_s, v2_timeout_s
from serve.predictor import Predictor
from serve.registry import Served
from serve.routes import VERSION_HEADER, preprocess_one, read_whole_body, registry
from serve.tasks.base import Task, V2Output

log = logging.getLogger(__name__)

v2 = Blueprint("v2", __name__)

SERVER_NAME = "torch-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "pytorch"
TENSOR_INPUT = "input"
IMAGE_INPUT = "image"
HEADER_LENGTH = "Inference-Header-Content-Length"


def _json(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json")


# --- errors: the V2 shape for everything raised under /v2 -------------------------------------------


@v2.errorhandler(ServeError)
def _serve_error(exc: ServeError) -> Response:
    return finish_serve_error(exc, _json({"error": exc.message}, exc.status))


@v2.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return finish_http_error(exc, _json({"error": exc.description or exc.name}, exc.code or 500))


@v2.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    note_error_code("internal_error")
    return _json({"error": "internal server error"}, 500)


# --- health and metadata ------------------------------------------------------------------------------


@v2.get("/v2/health/live")
def server_live():
    return _json({"live": True})


@v2.get("/v2/health/ready")
def server_ready():
    ready = registry().ready
    return _json({"ready": ready}, 200 if ready else 503)


@v2.get("/v2")
def server_metadata():
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


def _model(name: str, version: str | None) -> Served:
    """Raises: ModelNotFoundError: no model of that name, or no such version of it."""
    return registry().served(name, version)


@v2.get("/v2/models/<name>")
@v2.get("/v2/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None):
    served = _model(name, version)
    predictor = served.predictor
    task = predictor.task
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    if task.fixed_size:
        inputs.insert(0, {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, *task.input_shape]})
    return _json({
        "name": predictor.spec.name,
        "versions": list(registry().versions(name).versions),
        "platform": PLATFORM,
        "parameters": {"task": task.name},
        "inputs": inputs,
        "outputs": task.v2_outputs(),
    })


@v2.get("/v2/models/<name>/ready")
@v2.get("/v2/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    return _json({"name": _model(name, version).name, "ready": True})  # served only once warm


@v2.route("/v2/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unknown_route(rest: str):
    """Anything else under /v2: 404, or 405 where another method would match, in the V2 error shape."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = set()
    for method in ("GET", "POST"):
        try:
            endpoint, _ = adapter.match(request.path, method=method)
        except HTTPException:
            continue
        if endpoint != request.endpoint:
            allowed.add(method)
    if allowed:
        if "GET" in allowed:
            allowed.add("HEAD")
        raise MethodNotAllowed(valid_methods=sorted(allowed))
    raise NotFound(f"no route {request.method} {request.path}")


# --- inference ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestedOutput:
    binary: bool
    classification: int  # top-K as "probability:index:label" strings; 0: the probabilities


@v2.post("/v2/models/<name>/infer")
@v2.post("/v2/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    reg = registry()
    served = _model(name, version)
    predictor = served.predictor
    task = predictor.task
    deadline = reg.deadline(header_timeout_s(request.headers), f"{request.headers.get(TIMEOUT_HEADER)} ms ({TIMEOUT_HEADER})")
    reg.admit(served.name, 1, deadline)
    header, binary = read_body()
    timeout = v2_timeout_s(_parameters(header, "request"))
    deadline = deadline.tighter(timeout, f"{timeout and round(timeout * 1e6)} us (the request's timeout parameter)")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError("'id' must be a string")
    outputs = parse_outputs(header, task)
    params = task.parse_params({k: str(v) for k, v in _parameters(header, "request").items()
                                if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
    kind, payload = parse_input(header, binary, predictor, reg.config.server.max_images_per_request)
    if kind == TENSOR_INPUT:
        prepared = None
        inference = reg.infer_float(served, torch.from_numpy(payload), deadline)
    else:
        prepared = [preprocess_one(predictor, data, i, len(payload)) for i, data in enumerate(payload)]
        inference = reg.infer(served, [p.tensor for p in prepared], deadline)
    g.batch_size = inference.batch_size  # for the access log
    classification = {out_name: out.classification for out_name, out in outputs.items()}
    tensors = {t.name: t for t in task.v2_tensors(inference.outputs, prepared, params, classification)}
    response: dict[str, Any] = {"model_name": predictor.spec.name, "model_version": served.version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = []
    chunks = []
    for out_name, out in outputs.items():
        tensor, data = render_output(tensors[out_name], out.binary)
        if out.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = data
        response["outputs"].append(tensor)
    if not chunks:
        answer = _json(response)
    else:
        head = json.dumps(response, separators=(",", ":")).encode()
        answer = Response(head + b"".join(chunks), mimetype="application/octet-stream")
        answer.headers[HEADER_LENGTH] = str(len(head))
    answer.headers[VERSION_HEADER] = served.tag
    return answer


def read_body() -> tuple[dict, bytes]:
    """Return the request's JSON header and the binary data after it (b"" without the extension).

    Raises:
        InvalidRequestError: no JSON object, or a bad Inference-Header-Content-Length.
        RequestEntityTooLarge: over max_upload_bytes, compressed or not.
        UnsupportedMediaTypeError: a Content-Encoding other than gzip or deflate.
    """
    body = read_whole_body(request)
    body = decompress(body, request.headers.get("Content-Encoding", ""), current_app.config.get("MAX_CONTENT_LENGTH"))
    raw_length = request.headers.get(HEADER_LENGTH)
    if raw_length is None:
        head, binary = body, b""
    else:
        try:
            length = int(raw_length)
        except ValueError:
            raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got '{raw_length[:40]}'") from None
        if not 0 <= length <= len(body):
            raise InvalidRequestError(f"{HEADER_LENGTH} {length} is outside the {len(body)}-byte body")
        head, binary = body[:length], body[length:]
    if not head.strip():
        raise InvalidRequestError("the request body is empty; send an inference request JSON object")
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"the inference request is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise InvalidRequestError("the inference request must be a JSON object")
    return header, binary


def decompress(body: bytes, encoding: str, limit: int | None) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(f"Content-Encoding '{encoding[:40]}' is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header, detected
    try:
        data = inflater.decompress(body, limit + 1 if limit else 0)
    except zlib.error as exc:
        raise InvalidRequestError(f"the {encoding} body can't be decompressed: {exc}") from None
    if limit and len(data) > limit:
        raise RequestEntityTooLarge(f"the decompressed body is over the {limit}-byte limit")
    if not inflater.eof:
        raise InvalidRequestError(f"the {encoding} body is truncated")
    return data


def _parameters(obj: dict, what: str) -> dict:
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
    default_binary = _parameters(header, "request").get("binary_data_output", False)
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
        params = _parameters(entry, f"output '{name}'")
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


def parse_input(header: dict, binary: bytes, predictor: Predictor, max_images: int) -> tuple[str, Any]:
    """Return ("input", float32 array [N, C, H, W]) or ("image", [image bytes, ...]).

    Raises:
        InvalidRequestError: not exactly one known input, or its datatype, shape or data is wrong.
    """
    inputs = header.get("inputs")
    channels, height, width = predictor.input_shape
    accepted = (TENSOR_INPUT, IMAGE_INPUT) if predictor.task.fixed_size else (IMAGE_INPUT,)
    expected = (f"'{TENSOR_INPUT}' (FP32 [N, {channels}, {height}, {width}]) or " if TENSOR_INPUT in accepted else ""
                ) + f"'{IMAGE_INPUT}' (BYTES [N], encoded images)"
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError(f"'inputs' must be a non-empty list holding {expected}")
    if len(inputs) != 1:
        raise InvalidRequestError(f"expected exactly one input, {expected}; got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise InvalidRequestError("each input must be an object with a 'name'")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if name not in accepted:
        raise InvalidRequestError(
            f"unexpected inference input '{name[:64]}' for model '{predictor.spec.name}'; send {expected}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidRequestError(f"input '{name}': 'shape' must be a list of non-negative integers")
    params = _parameters(tensor, f"input '{name}'")
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
        return name, float_tensor(name, shape, tensor.get("data"), raw)
    return name, image_elements(name, count, tensor.get("data"), raw)


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
