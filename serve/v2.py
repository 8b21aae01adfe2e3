"""Open Inference Protocol (KServe V2, Triton's HTTP/REST API) under /v2, as a Blueprint: `app.register_blueprint(v2)`.

Routes (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/):

    GET  /v2/health/live                               200 {"live": true}
    GET  /v2/health/ready                              200 {"ready": true}; 503 {"ready": false} while loading
    GET  /v2                                           {"name", "version", "extensions"}
    GET  /v2/models/<name>[/versions/<v>]              {"name", "versions", "platform", "inputs", "outputs"}
    GET  /v2/models/<name>[/versions/<v>]/ready        200 {"name", "ready": true}; 503 when not warm
    POST /v2/repository/index                          [{"name", "version", "state", "reason"}] (Triton's)
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
forward included) runs on the scheduler's inference thread.
"""
from __future__ import annotations

import json
import zlib

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)

from serve.access import request_trace
from serve.response_notes import note
from serve.admission import v2_timeout_s
from serve.errors import (
    InvalidRequestError,
    UnsupportedMediaTypeError,
)
from serve.http_io import (
    VERSION_HEADER,
    answer_errors_as_messages,
    client_of,
    client_timeout,
    compact_json,
    read_whole_body,
)
from serve.model_table import Served
from serve.service import Call, Inputs, PredictionService
from serve.v2_codec import IMAGE_INPUT, TENSOR_INPUT, encode_response, parameters, parse_input, parse_outputs

v2 = Blueprint("v2", __name__)

SERVER_NAME = "torch-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "pytorch"
HEADER_LENGTH = "Inference-Header-Content-Length"
answer_errors_as_messages(v2)


# --- health and metadata ------------------------------------------------------------------------------


@v2.get("/v2/health/live")
def server_live():
    return compact_json({"live": True})


@v2.get("/v2/health/ready")
def server_ready():
    ready = service().table.ready
    return compact_json({"ready": ready}, 200 if ready else 503)


@v2.get("/v2")
def server_metadata():
    return compact_json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


def service() -> PredictionService:
    return current_app.extensions["serve"]


def _model(name: str, version: str | None) -> Served:
    """Raises: ModelNotFoundError: no model of that name, or no such version of it."""
    return service().table.served(name, version)


@v2.get("/v2/models/<name>")
@v2.get("/v2/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None):
    served = _model(name, version)
    task = served.task
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    if task.fixed_size:
        inputs.insert(0, {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, *task.input_shape]})
    return compact_json({
        "name": served.name,
        "versions": list(service().table.versions(name).versions),
        "platform": PLATFORM,
        "parameters": {"task": task.name},
        "inputs": inputs,
        "outputs": task.v2_outputs(),
    })


@v2.get("/v2/models/<name>/ready")
@v2.get("/v2/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    return compact_json({"name": _model(name, version).name, "ready": True})  # served only once warm


@v2.post("/v2/repository/index")
def repository_index():
    """Triton's repository index: every model version with READY, LOADING or UNAVAILABLE (a lazy
    model not loaded now, or evicted); {"ready": true} lists only the READY ones."""
    body = request.get_json(silent=True) if request.get_data() else {}
    if not isinstance(body, dict):
        raise InvalidRequestError("the repository index request must be a JSON object, e.g. {\"ready\": true}")
    rows = service().table.index()
    if body.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return compact_json([{k: v for k, v in row.items() if v != "" or k != "reason"} for row in rows])


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


@v2.post("/v2/models/<name>/infer")
@v2.post("/v2/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    request_id, outputs = None, {}

    def read(served: Served) -> Inputs:
        nonlocal request_id, outputs
        header, binary = read_body()
        params = parameters(header, "request")
        timeout = v2_timeout_s(params)
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError("'id' must be a string")
        outputs = parse_outputs(header, served.task)
        task_params = {k: str(v) for k, v in params.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        kind, payload = parse_input(header, binary, served.task, served.name, service().settings.max_images_per_request)
        source = f"{timeout and round(timeout * 1e6)} us (the request's timeout parameter)"
        if kind == TENSOR_INPUT:
            return Inputs(tensor=payload, params=task_params, timeout_s=timeout, timeout_source=source)
        return Inputs(images=payload, params=task_params, timeout_s=timeout, timeout_source=source)

    timeout_s, timeout_source = client_timeout(request)
    answer = service().predict(Call(read, name, version, timeout_s=timeout_s, timeout_source=timeout_source,
                                    client=client_of(request), trace=request_trace()))
    classification = {out_name: out.classification for out_name, out in outputs.items()}
    header = {"model_name": answer.model, "model_version": answer.version}
    if request_id is not None:
        header["id"] = request_id
    body, head_length = encode_response(header, answer.v2_tensors(classification), outputs)
    if head_length is None:
        response = Response(body, mimetype="application/json")
    else:
        response = Response(body, mimetype="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(head_length)
    response.headers[VERSION_HEADER] = answer.tag
    return note(response, batch_size=answer.batch_size)


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
