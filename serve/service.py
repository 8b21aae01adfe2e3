"""Prediction service: the one path from a parsed request to an answer, whatever door it came through.

A door (the HTTP routes, V2, the CLI, the benchmarks) parses its protocol into a Call and renders the
Answer back; the service does everything in between, in this order:

    look up the model version -> the task's parameters and answer format -> the deadline -> admission
    (before the body is read) -> the door reads its inputs -> decode + the task's prepare, per image
    -> the scheduler (admitted again with the image count, batched, run) -> Answer

(a lazy model not loaded now is loaded at the lookup, by the first request that needs it.)

No Flask, HTTP or gRPC in here: what a door needs for its access log (the batch size, the version that
answered) travels on the Answer.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from serve.config import ServeConfig, ServerSettings
from serve.errors import InvalidRequestError, ServeError
from serve.metrics import Metrics
from serve.model_table import ModelTable, Served
from serve.scheduler import Scheduler
from serve.tasks.base import Prepared, Result, Task, V2Output
from serve.tracing import NO_TRACE, RequestTrace, Tracing


@dataclass(frozen=True)
class Inputs:
    """A request's inputs as its door read them (after admission): encoded images, or a float batch
    [N, C, H, W] already preprocessed; and what the body said of the task's parameters and deadline."""

    images: Sequence[bytes] = ()
    tensor: np.ndarray | None = None
    params: Mapping[str, str] | None = None  # the task's parameters given in the body (V2's request parameters)
    timeout_s: float | None = None  # a deadline given in the body (V2's timeout parameter)
    timeout_source: str = "the request's timeout"


@dataclass(frozen=True)
class Call:
    """One prediction as a door parsed it.

    `read` takes the model version that will answer and returns the inputs: it is called only once
    the request is admitted, so a refused request's body is never read or decoded.
    """

    read: Callable[[Served], Inputs]
    model: str | None = None  # None: the config's first model
    version: str | None = None  # None: the model's default version
    params: Mapping[str, str] = field(default_factory=dict)  # the task's parameters (?topk=3), as text
    answer_format: str | None = None  # json, torchserve, png; None: the model's response_format
    timeout_s: float | None = None  # the client's deadline, when sooner than request_timeout_s
    timeout_source: str = "the request's deadline"  # who set it, for the error message
    client: Hashable | None = None  # the connection, for holding refusals it resends at once
    trace: RequestTrace = NO_TRACE  # the door's span of the request (serve/tracing.py); its stages are timed here


@dataclass(frozen=True)
class Answer:
    """A prediction: the task's outputs (one per input), what rendering them needs, the largest batch
    they ran in and the version that answered."""

    served: Served
    outputs: list[Any]
    prepared: list[Prepared] | None  # None for a float batch (nothing to map results back to)
    params: dict[str, Any]
    answer_format: str
    batch_size: int
    trace: RequestTrace = NO_TRACE  # its postprocess is timed as rendering asks for the results

    @property
    def model(self) -> str:
        return self.served.name

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def tag(self) -> str:
        """The version that answered and its checkpoint's sha256, as X-Model-Version shows them."""
        return self.served.tag

    @property
    def task(self) -> Task:
        return self.served.task

    def results(self) -> list[Result]:
        """The task's typed result for each image."""
        with self.trace.stage("postprocess"):
            return [self.task.finish(o, p, self.params) for o, p in zip(self.outputs, self._prepared())]

    def torchserve(self) -> Any:
        """The answer in the shape of TorchServe's handler for the task."""
        with self.trace.stage("postprocess"):
            return self.task.torchserve(self.outputs, self._prepared(), self.params)

    def png(self) -> bytes:
        """The first image's answer as a PNG (a segmentation mask)."""
        with self.trace.stage("postprocess"):
            return self.task.png(self.outputs[0], self._prepared()[0])

    def v2_tensors(self, classification: Mapping[str, int]) -> list[V2Output]:
        """The V2 output tensors; `classification` maps output names to Triton's top-K (0: none)."""
        with self.trace.stage("postprocess"):
            return self.task.v2_tensors(self.outputs, self.prepared, self.params, dict(classification))

    def _prepared(self) -> list[Prepared]:
        if self.prepared is None:
            raise InvalidRequestError("a preprocessed tensor input has no image to render an answer for")
        return self.prepared


class PredictionService:
    """The model table and the scheduler behind every door, and the tracer the doors start spans with."""

    def __init__(self, table: ModelTable, scheduler: Scheduler, tracing: Tracing | None = None):
        self.table = table
        self.scheduler = scheduler
        self.tracing = tracing or Tracing()  # off unless given

    @classmethod
    def load(cls, config: ServeConfig, names: list[str] | None = None, metrics: Metrics | None = None,
             include_lazy: bool = False, tracing: Tracing | None = None) -> PredictionService:
        """Load and warm every model of the config (or those named); lazy ones only with include_lazy
        (else on first use). `tracing`: the server's (serve/app.py); None: off.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model; nothing is left running.
        """
        scheduler = Scheduler.for_settings(config.server, metrics)
        table = ModelTable(config, scheduler, metrics)
        try:
            table.load(names, include_lazy)
        except BaseException:
            scheduler.close()
            raise
        return cls(table, scheduler, tracing)

    @property
    def settings(self) -> ServerSettings:
        return self.table.config.server

    def predict(self, call: Call) -> Answer:
        """Run one prediction from lookup to answer.

        Raises:
            ModelNotFoundError: no such model or version.
            ModelTooLargeError, CheckpointError, ...: a lazy model that doesn't load.
            InvalidRequestError: bad parameters or format, or what the door's read raises.
            InvalidImageError, ImageTooLargeError: an image that can't be decoded, naming which one.
            OverloadedError: refused by admission (before the body is read, or when queued).
            BatchTimeoutError: no answer before the deadline.
        """
        trace = call.trace
        deadline = self.scheduler.deadline(call.timeout_s, call.timeout_source)
        with self.table.use(call.model, call.version, deadline) as served:  # a lazy model loads here
            if trace.recording:
                trace.serving(served.name, served.version, served.predictor.runtime.name)
            task = served.task
            params = task.parse_params(call.params)
            answer_format = self._answer_format(served, call.answer_format)
            self.scheduler.admit(served.name, 1, deadline, call.client, trace)
            with trace.stage("read"):
                inputs = call.read(served)
            deadline = deadline.tighter(inputs.timeout_s, inputs.timeout_source)
            if inputs.params is not None:
                params = task.parse_params(inputs.params)
            if inputs.tensor is not None:
                prepared = None
                lane, batch = served.lanes.tensors, list(torch.from_numpy(inputs.tensor))
            else:
                with trace.stage("decode", **{"serve.images": len(inputs.images)}):
                    prepared = [self._prepare(served, data, i, len(inputs.images))
                                for i, data in enumerate(inputs.images)]
                lane, batch = served.lanes.images, [p.tensor for p in prepared]
            outputs, batch_size = self.scheduler.run(served.name, lane, batch, deadline, call.client, trace)
        return Answer(served, outputs, prepared, params, answer_format, batch_size, trace)

    @staticmethod
    def _answer_format(served: Served, asked: str | None) -> str:
        """Raises: InvalidRequestError: a format the task doesn't answer."""
        answer_format = asked or served.predictor.spec.response_format
        if answer_format not in served.task.formats:
            raise InvalidRequestError(f"format must be one of {list(served.task.formats)} for task "
                                      f"'{served.task.name}', got '{answer_format[:40]}'")
        return answer_format

    @staticmethod
    def _prepare(served: Served, data: bytes, index: int, count: int) -> Prepared:
        """Decode one image; with several, the error names which one failed."""
        try:
            return served.predictor.preprocess(data)
        except ServeError as exc:
            if count == 1:
                raise
            raise type(exc)(f"image {index + 1} of {count}: {exc.message}") from None

    def start_worker(self, busy_sessions: bool, server_pid: int | None = None) -> None:
        """In a serving process after the fork: start every runtime here (ONNX Runtime sessions are per
        process) and follow the host's load. busy_sessions: more than one worker shares the cores."""
        self.scheduler.start(server_pid)  # first: the inference thread's priority, which the runtimes' threads inherit
        self.table.warm_runtimes(busy_sessions)
        self.tracing.start()  # after the fork: the exporter's thread is this process's

    @property
    def closed(self) -> bool:
        return self.scheduler.closed

    def close(self) -> None:
        self.scheduler.close()
        self.tracing.shutdown()
