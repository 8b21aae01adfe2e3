"""The Open Inference Protocol over gRPC (KServe V2, Triton's inference.GRPCInferenceService): parse, call
the prediction service, render. No pipeline here: every prediction goes through PredictionService.predict,
and V2's tensor rules through serve/v2_codec.py, exactly as the REST door (serve/v2.py) uses them.

Methods: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelStreamInfer (a bidirectional stream, answered in request order), RepositoryIndex. The others of
Triton's service (model control, shared memory, statistics, trace) answer UNIMPLEMENTED.

ModelInfer takes the same inputs, outputs and parameters as POST /v2/models/<name>/infer: one input,
`image` (BYTES [N], an encoded image per element) or `input` (FP32 [N, C, H, W], preprocessed; tasks
with a fixed input size), its data in raw_input_contents (as tritonclient always sends it) or in
contents (bytes_contents, fp32_contents); the output parameter `classification`; the request
parameter `timeout` (microseconds); the gRPC deadline as the request's deadline. Outputs are always
raw (raw_output_contents), the only form tritonclient decodes. The answer names its version in
model_version and in the response parameter `model_version_tag` ("<version> <sha256[:12]>", as the
X-Model-Version header); a unary answer also carries x-model-version and x-request-id as trailing
metadata.

API keys come from the metadata (`authorization: Bearer <key>` or `x-api-key`) with the scopes of
serve/auth.py ("grpc.<method>"). Errors map from ServeError in grpc_status(); a refusal by admission is
UNAVAILABLE with trailing metadata retry-after (seconds). Every call writes the access-log line of
serve/access.py and, for predictions, the request metrics with protocol="grpc".
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serve.access import UNKNOWN_MODEL, access_line
from serve.admission import v2_timeout_s
from serve.auth import ApiKeys, check_key, key_from
from serve.errors import InvalidRequestError, ServeError
from serve.metrics import Metrics
from serve.model_table import Served
from serve.proto import open_inference_pb2 as pb
from serve.service import Answer, Call, Inputs, PredictionService
from serve.tracing import NO_TRACE, RequestTrace
from serve.v2_codec import TENSOR_INPUT, check_input_count, parse_outputs, parse_tensor, raw_outputs

log = logging.getLogger(__name__)
access_log = logging.getLogger("serve.access")

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "torch-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "model_repository"]
PLATFORM = "pytorch"
STREAM_WINDOW = 8  # requests of one stream in flight at once (they batch together); answers stay in order
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
NO_DEADLINE_S = 1e8  # grpcio reports a call without a deadline as one centuries away
UNTRACED_METHODS = {"ServerLive", "ServerReady", "ModelReady"}  # probes (serve/tracing.py)

# ServeError.status -> the gRPC status code; the one mapping of every error this door answers.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: ServeError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code and trailing metadata for an error: a deadline that passed is DEADLINE_EXCEEDED;
    every 503 (overloaded, not ready, timed out) carries retry-after, as REST's Retry-After."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED if exc.code == "timeout" else STATUS_CODES.get(
        exc.status, grpc.StatusCode.INTERNAL)
    metadata = [(name.lower(), value) for name, value in exc.headers.items()]  # www-authenticate
    if exc.status == 503:
        metadata.append(("retry-after", str(getattr(exc, "retry_after_s", 1))))
    return code, tuple(metadata)


def parameter_value(param: pb.InferParameter) -> Any:
    """An InferParameter as the Python value V2's JSON would hold."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def parameter_dict(params) -> dict[str, Any]:
    return {name: parameter_value(value) for name, value in params.items()}


@dataclass
class Record:
    """One call's access-log line and metrics, filled in as it runs."""

    method: str
    context: grpc.ServicerContext
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    batch_size: int | None = None
    bytes_in: int | None = None
    key: str | None = None
    trace: RequestTrace = NO_TRACE  # the call's SERVER span (serve/tracing.py)


class InferenceDoor:
    """The servicer of inference.GRPCInferenceService over one PredictionService."""

    def __init__(self, service: PredictionService, metrics: Metrics, keys: ApiKeys | None = None):
        self.service = service
        self.metrics = metrics
        self.keys = keys

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, under Triton's service name."""
        unary = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, False),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, False),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, False),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, False),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, False),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, True),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, False),
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            self._unary(name, fn, prediction), request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString())
            for name, (fn, request_type, prediction) in unary.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # --- the frame of every call: key, errors, access log, metrics ---------------------------------

    def _unary(self, method: str, fn: Callable, prediction: bool) -> Callable:
        def handle(request, context: grpc.ServicerContext):
            record = self._record(method, context, getattr(request, "id", ""))
            self._trace(record)
            error = None
            try:
                record.key = self._authorize(method, context)
                if prediction:
                    record.bytes_in = request.ByteSize()
                response = fn(request, context, record)
            except ServeError as exc:
                error = exc
            except Exception:
                log.exception("unhandled error in %s", method)
                error = ServeError("internal server error")
            self._finish(record, error, prediction)
            if error is not None:
                code, metadata = grpc_status(error)
                context.set_trailing_metadata((("x-request-id", record.request_id), *metadata))
                context.abort(code, error.message)
            return response
        return handle

    def _record(self, method: str, context: grpc.ServicerContext, given_id: str) -> Record:
        metadata = dict(context.invocation_metadata())
        given = given_id or metadata.get("x-request-id", "")
        return Record(method, context, given if REQUEST_ID.match(given) else uuid.uuid4().hex)

    def _trace(self, record: Record) -> None:
        """Start the call's SERVER span, continuing the traceparent of its metadata (not for probes)."""
        if self.service.tracing.enabled and record.method not in UNTRACED_METHODS:
            record.trace = self.service.tracing.request(f"{SERVICE}/{record.method}", dict(
                record.context.invocation_metadata()), {
                "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": record.method,
                "client.address": record.context.peer(), "serve.request_id": record.request_id,
                "serve.protocol": "grpc"})

    def _authorize(self, method: str, context: grpc.ServicerContext) -> str | None:
        """Raises: UnauthorizedError, ForbiddenError: as serve/auth.py decides for "grpc.<method>"."""
        if self.keys is None:
            return None
        metadata = dict(context.invocation_metadata())
        key = check_key(self.keys, f"grpc.{method}", key_from(metadata.get("authorization"), metadata.get("x-api-key")))
        return key.name if key is not None else None

    def _finish(self, record: Record, error: ServeError | None, prediction: bool) -> None:
        elapsed = time.perf_counter() - record.started
        status = 200 if error is None else error.status
        if prediction:
            model = record.model if record.model in self.service.table.wanted else UNKNOWN_MODEL
            self.metrics.observe_request(model, status, elapsed, "grpc")
        if error is not None:
            self.metrics.errors.labels(error.code).inc()
        if record.trace.recording:
            code = grpc.StatusCode.OK if error is None else grpc_status(error)[0]
            attributes = {"rpc.grpc.status_code": code.value[0]}
            if record.batch_size is not None:
                attributes["serve.batch_size"] = record.batch_size
            if error is not None:
                attributes["serve.error_code"] = error.code
            record.trace.finish(attributes, error=error.message if error is not None and status >= 500 else None)
        access_log.info(access_line(record.request_id, "POST", f"/{SERVICE}/{record.method}", record.model, status,
                                    elapsed, record.batch_size, record.bytes_in, record.context.peer(), record.key,
                                    "grpc", record.trace))

    # --- health and metadata ------------------------------------------------------------------------

    def server_live(self, request, context, record) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request, context, record) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.table.ready)

    def server_metadata(self, request, context, record) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    def _served(self, record: Record, name: str, version: str) -> Served:
        """Raises: ModelNotFoundError: no model of that name, or no such version of it."""
        record.model = name
        return self.service.table.served(name, version or None)

    def model_ready(self, request, context, record) -> pb.ModelReadyResponse:
        table = self.service.table
        if table.is_lazy(request.name) and request.name not in table.models:
            record.model = request.name
            return pb.ModelReadyResponse(ready=False)  # load: lazy, not loaded now: the first prediction loads it
        self._served(record, request.name, request.version)
        return pb.ModelReadyResponse(ready=True)  # served only once warm

    def model_metadata(self, request, context, record) -> pb.ModelMetadataResponse:
        served = self._served(record, request.name, request.version)
        task = served.task
        response = pb.ModelMetadataResponse(name=served.name, platform=PLATFORM,
                                            versions=list(self.service.table.versions(served.name).versions))
        if task.fixed_size:
            response.inputs.add(name=TENSOR_INPUT, datatype="FP32", shape=[-1, *task.input_shape])
        response.inputs.add(name="image", datatype="BYTES", shape=[-1])
        for output in task.v2_outputs():
            response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        return response

    def repository_index(self, request, context, record) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for row in self.service.table.index():
            if row["state"] == "READY" or not request.ready:
                response.models.add(**row)
        return response

    # --- inference ------------------------------------------------------------------------------------

    def model_infer(self, request: pb.ModelInferRequest, context, record: Record) -> pb.ModelInferResponse:
        response, tag = self._infer(request, context, record)
        context.set_trailing_metadata((("x-model-version", tag), ("x-request-id", record.request_id)))
        return response

    def _infer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext, record: Record
               ) -> tuple[pb.ModelInferResponse, str]:
        """One inference through the prediction service; the answer and its version tag.

        Raises: ServeError: whatever PredictionService.predict raises, and what parsing the request does.
        """
        outputs = {}
        record.model = request.model_name

        def read(served: Served) -> Inputs:
            nonlocal outputs
            params = parameter_dict(request.parameters)
            timeout = v2_timeout_s(params)
            outputs = parse_outputs({"parameters": params, "outputs": [
                {"name": o.name, "parameters": parameter_dict(o.parameters)} for o in request.outputs]}, served.task)
            task_params = {k: str(v) for k, v in params.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            name, payload = read_input(request, served, self.service.settings.max_images_per_request)
            source = f"{timeout and round(timeout * 1e6)} us (the request's timeout parameter)"
            if name == TENSOR_INPUT:
                return Inputs(tensor=payload, params=task_params, timeout_s=timeout, timeout_source=source)
            return Inputs(images=payload, params=task_params, timeout_s=timeout, timeout_source=source)

        timeout_s = context.time_remaining()
        if timeout_s is not None and timeout_s > NO_DEADLINE_S:
            timeout_s = None
        answer = self.service.predict(Call(read, request.model_name, request.model_version or None,
                                           timeout_s=timeout_s, timeout_source="the gRPC deadline",
                                           client=context.peer(), trace=record.trace))
        record.batch_size = answer.batch_size
        return render_answer(answer, request.id, outputs), answer.tag

    def model_stream_infer(self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
                           ) -> Iterator[pb.ModelStreamInferResponse]:
        """Answer each request of the stream in order. Up to STREAM_WINDOW run at once (they batch
        together); a request that fails is answered with its error_message and the stream goes on."""
        record = self._record("ModelStreamInfer", context, "")
        try:
            key = self._authorize("ModelStreamInfer", context)
        except ServeError as exc:
            self._finish(record, exc, False)
            code, metadata = grpc_status(exc)
            context.set_trailing_metadata(metadata)
            context.abort(code, exc.message)
        window = threading.Semaphore(STREAM_WINDOW)
        closed = threading.Event()
        answers: queue.Queue[Future | None] = queue.Queue()

        def on_close() -> None:
            closed.set()
            window.release()  # a reader waiting for room sees the stream is over

        context.add_callback(on_close)
        pool = ThreadPoolExecutor(STREAM_WINDOW, thread_name_prefix="grpc-stream")

        def read_requests() -> None:
            try:
                for request in requests:
                    window.acquire()
                    if closed.is_set():
                        return
                    answers.put(pool.submit(self._stream_one, request, context, key))
            except Exception as exc:  # the client went away mid-message: grpc ends the iterator so
                log.debug("stream ended: %s", exc)
            finally:
                answers.put(None)

        threading.Thread(target=read_requests, name="grpc-stream-reader", daemon=True).start()
        try:
            while (future := answers.get()) is not None:
                answer = future.result()
                window.release()
                yield answer
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _stream_one(self, request: pb.ModelInferRequest, context: grpc.ServicerContext, key: str | None
                    ) -> pb.ModelStreamInferResponse:
        record = self._record("ModelStreamInfer", context, request.id)
        self._trace(record)
        record.key, record.bytes_in = key, request.ByteSize()
        error = None
        try:
            response, _ = self._infer(request, context, record)
        except ServeError as exc:
            error = exc
        except Exception:
            log.exception("unhandled error in ModelStreamInfer")
            error = ServeError("internal server error")
        self._finish(record, error, True)
        if error is not None:
            return pb.ModelStreamInferResponse(error_message=error.message)
        return pb.ModelStreamInferResponse(infer_response=response)


def read_input(request: pb.ModelInferRequest, served: Served, max_images: int) -> tuple[str, Any]:
    """The request's one input, from raw_input_contents or its typed contents, checked by V2's rules.

    Raises:
        InvalidRequestError: not exactly one known input, its data in neither place or in both, or a
            datatype, shape or element count that doesn't fit.
    """
    check_input_count(len(request.inputs), served.task)
    tensor = request.inputs[0]
    if "shared_memory_region" in tensor.parameters:
        raise InvalidRequestError(f"input '{tensor.name[:64]}': shared memory is not supported by this server")
    raw, elements = None, None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidRequestError(f"{len(request.raw_input_contents)} raw_input_contents for "
                                      f"{len(request.inputs)} input; send one per input")
        if tensor.HasField("contents"):
            raise InvalidRequestError(f"input '{tensor.name[:64]}' has both contents and raw_input_contents")
        raw = request.raw_input_contents[0]
    elif not tensor.HasField("contents"):
        raise InvalidRequestError(f"input '{tensor.name[:64]}' has no contents and no raw_input_contents")
    elif tensor.datatype == "BYTES":
        elements = list(tensor.contents.bytes_contents)
    else:  # FP32 (or a datatype parse_tensor refuses before looking at the data)
        raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    return parse_tensor(tensor.name, tensor.datatype, list(tensor.shape), served.task, served.name, max_images,
                        raw=raw, elements=elements)


def render_answer(answer: Answer, request_id: str, outputs) -> pb.ModelInferResponse:
    """The answer with every requested output raw, in the order asked."""
    classification = {name: out.classification for name, out in outputs.items()}
    response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version, id=request_id)
    response.parameters["model_version_tag"].string_param = answer.tag
    for description, data in raw_outputs(answer.v2_tensors(classification), outputs):
        response.outputs.add(name=description["name"], datatype=description["datatype"], shape=description["shape"])
        response.raw_output_contents.append(data)
    return response
