"""Tracing (serve/tracing.py): the span tree of a request and of a shared batch, traceparent continued,
trace ids in the access log, probes untraced, off by default; and a real gunicorn exporting over OTLP/HTTP."""
from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import image_bytes, tiny_model_config, write_config
from servers import Server, free_port

from serve.config import ServerSettings, load_server_settings
from serve.errors import ConfigError
from serve.tracing import NO_TRACE, Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
STAGES = ["read", "decode", "queue", "forward", "postprocess", "encode"]


@pytest.fixture
def traced(make_app):
    """make_app with tracing on and spans kept in memory: (app, exporter)."""
    def make(*models, **server):
        app = make_app(*models, tracing="otlp", **server)
        exporter = InMemorySpanExporter()
        app.extensions["serve"].tracing.start(exporter=exporter)
        return app, exporter
    return make


def by_name(spans) -> dict:
    found = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def test_one_request_is_a_server_span_with_its_stages(traced, caplog):
    app, exporter = traced()
    with caplog.at_level(logging.INFO, logger="serve.access"):
        response = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png",
                                          headers={"traceparent": PARENT, "tracestate": "vendor=1"})
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    server = spans.pop("POST /predictions/<name>")[0]
    assert server.kind == SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID  # the client's trace, continued
    assert server.parent.span_id == 0x00f067aa0ba902b7 and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "1"
    assert server.attributes["http.route"] == "/predictions/<name>"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["serve.model"] == "tiny" and server.attributes["serve.version"] == "1"
    assert server.attributes["serve.batch_size"] == 1
    assert sorted(spans) == sorted(STAGES)
    children = [only for name in STAGES for only in spans[name]]
    assert all(s.parent.span_id == server.context.span_id and s.context.trace_id == server.context.trace_id
               for s in children)
    starts = [s.start_time for s in children]
    assert starts == sorted(starts)  # in the request's order
    assert all(server.start_time <= s.start_time and s.end_time <= server.end_time for s in children)
    assert spans["decode"][0].attributes["serve.images"] == 1
    queue, forward = spans["queue"][0], spans["forward"][0]
    assert "serve.predicted_wait_ms" in queue.attributes and queue.attributes["serve.batch_size"] == 1
    assert queue.end_time == forward.start_time  # waiting ends as its batch starts
    assert [link.context.span_id for link in queue.links] == [forward.context.span_id]
    assert dict(forward.attributes) == {"serve.model": "tiny", "serve.version": "1", "serve.runtime": "eager",
                                        "serve.batch_size": 1, "serve.lane": "images", "serve.requests": 1}
    assert [(link.context.span_id, link.attributes["serve.images"]) for link in forward.links] == [
        (server.context.span_id, 1)]
    line = next(json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access")
    assert line["trace_id"] == TRACE_ID and line["span_id"] == f"{server.context.span_id:016x}"


def test_two_requests_sharing_a_batch_link_to_one_forward_span(traced, tiny_checkpoint):
    # A batch of two waits (10 s at most) for its second image: the two requests share one forward.
    app, exporter = traced(tiny_model_config(tiny_checkpoint, max_batch_size=2, max_delay_ms=10_000))
    post = lambda i: app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png",  # noqa: E731
                                            headers={"X-Request-ID": f"r{i}"})
    with ThreadPoolExecutor(2) as pool:
        assert [r.status_code for r in pool.map(post, range(2))] == [200, 200]
    spans = by_name(exporter.get_finished_spans())
    servers = spans["POST /predictions/<name>"]
    assert len(servers) == 2 and len({s.context.trace_id for s in servers}) == 2  # two traces
    (forward,) = spans["forward"]  # one span for the batch
    assert forward.attributes["serve.batch_size"] == 2 and forward.attributes["serve.requests"] == 2
    assert sorted(link.context.span_id for link in forward.links) == sorted(s.context.span_id for s in servers)
    assert all(link.attributes["serve.images"] == 1 for link in forward.links)
    assert forward.parent.span_id in {s.context.span_id for s in servers}  # under the first request it served
    for server in servers:
        trace_id = server.context.trace_id
        (queue,) = [s for s in spans["queue"] if s.context.trace_id == trace_id]
        assert queue.attributes["serve.batch_size"] == 2 and queue.end_time == forward.start_time
        assert [link.context.span_id for link in queue.links] == [forward.context.span_id]
        mine = {name for name, found in spans.items() for s in found if s.context.trace_id == trace_id}
        assert mine >= {"read", "decode", "queue", "postprocess", "encode"}
        assert server.attributes["serve.batch_size"] == 2


def test_probes_and_metrics_are_not_traced(traced):
    app, exporter = traced()
    client = app.test_client()
    for path in ("/ping", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready", "/"):
        client.get(path)
    assert exporter.get_finished_spans() == ()
    assert client.get("/models").status_code == 200
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /models"]


def test_a_refused_request_records_why(traced):
    app, exporter = traced(max_queue_wait_ms=1)
    waiting = [Future() for _ in range(100)]  # work ahead on the inference thread, as admission counts it
    service_time = app.extensions["serve"].scheduler.service_time
    service_time.track("tiny", waiting)
    service_time.observe("tiny", 1, 1.0)
    response = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png")
    for future in waiting:
        future.set_result(None)
    assert response.status_code == 503
    spans = by_name(exporter.get_finished_spans())
    queue = spans["queue"][0]
    assert queue.attributes["serve.shed_reason"] == "predicted_wait"
    assert queue.attributes["serve.predicted_wait_ms"] > 1 and queue.status.status_code == StatusCode.ERROR
    server = spans["POST /predictions/<name>"][0]
    assert server.attributes["serve.shed_reason"] == "predicted_wait"
    assert server.attributes["http.response.status_code"] == 503 and server.status.status_code == StatusCode.ERROR
    assert "read" not in spans  # refused before its body is read


def test_a_request_whose_deadline_passes_while_queued_says_so(traced, tiny_checkpoint):
    # Its batch waits up to 1 s for a second image that never comes; its deadline is 100 ms.
    app, exporter = traced(tiny_model_config(tiny_checkpoint, max_batch_size=2, max_delay_ms=1000))
    response = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png",
                                      headers={"X-Request-Timeout-Ms": "100"})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "timeout"
    spans = by_name(exporter.get_finished_spans())
    (queue,) = spans["queue"]
    assert queue.attributes["serve.shed_reason"] == "deadline" and queue.status.status_code == StatusCode.ERROR
    assert "forward" not in spans  # the batcher skipped its cancelled image


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)  # as if opentelemetry-sdk were not installed
    with pytest.raises(ConfigError, match=r"needs opentelemetry-sdk, which is not installed: pip install 'ckpt-serve\[tracing\]'"):
        Tracing(ServerSettings(tracing="otlp"))


def test_a_collector_that_does_not_answer_holds_the_stop_briefly(caplog):
    release = threading.Event()

    class Stuck(InMemorySpanExporter):
        def shutdown(self):  # as an exporter still retrying a collector that is down
            release.wait(30)

    tracing = Tracing(ServerSettings(tracing="otlp"))
    tracing.start(exporter=Stuck())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="serve.tracing"):
        tracing.shutdown(timeout_s=0.2)
    release.set()
    assert time.monotonic() - started < 5
    assert "spans not exported within 0.2 s" in caplog.text and not tracing.enabled


def test_v2_and_v1_requests_are_traced(traced):
    app, exporter = traced()
    client = app.test_client()
    v1 = client.post("/v1/models/tiny:predict", json={"instances": [{"b64": base64.b64encode(image_bytes()).decode()}]},
                     headers={"traceparent": PARENT})
    assert v1.status_code == 200
    v2 = client.post("/v2/models/tiny/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                "data": [base64.b64encode(image_bytes()).decode()]}]})
    assert v2.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert f"{spans['POST /v1/models/<name>:predict'][0].context.trace_id:032x}" == TRACE_ID
    assert "POST /v2/models/<name>/infer" in spans
    assert len(spans["forward"]) == 2 and len(spans["postprocess"]) == 2 and len(spans["encode"]) == 2


def test_off_by_default_and_from_the_otel_variables(client, caplog):
    assert ServerSettings().tracing == "off"
    assert client.application.extensions["serve"].tracing.request("GET /", {}, {}) is NO_TRACE
    with caplog.at_level(logging.INFO, logger="serve.access"):
        client.post("/predictions/tiny", data=image_bytes(), content_type="image/png", headers={"traceparent": PARENT})
    line = next(json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access")
    assert "trace_id" not in line and "span_id" not in line  # the line is as it was
    assert load_server_settings(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}).tracing == "otlp"
    assert load_server_settings(env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}).tracing == "otlp"
    assert load_server_settings(env={"OTEL_TRACES_EXPORTER": "console"}).tracing == "console"
    assert load_server_settings(env={"OTEL_TRACES_EXPORTER": "none",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}).tracing == "off"
    assert load_server_settings(env={"OTEL_SDK_DISABLED": "true",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}).tracing == "off"
    sampled = load_server_settings(env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                        "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert (sampled.tracing_sampler, sampled.tracing_sampler_arg) == ("parentbased_traceidratio", 0.25)
    with pytest.raises(ConfigError, match="OTLP/HTTP only"):
        load_server_settings(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(ConfigError, match="tracing_sampler"):
        load_server_settings(env={"OTEL_TRACES_SAMPLER": "jaeger_remote"})


def test_sampling_follows_the_setting_and_the_parent(traced):
    app, exporter = traced(tracing_sampler="parentbased_always_off")
    client = app.test_client()
    assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png").status_code == 200
    assert exporter.get_finished_spans() == ()  # not sampled: no span, nothing carried to the batch
    assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png",
                       headers={"traceparent": PARENT}).status_code == 200  # the caller sampled it
    assert {s.name for s in exporter.get_finished_spans()} == {"POST /predictions/<name>", *STAGES}


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: decodes each export (protobuf) into plain dicts."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.spans.extend(decode(export))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


def decode(export: ExportTraceServiceRequest) -> list[dict]:
    spans = []
    for resource_spans in export.resource_spans:
        resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                              "parent": span.parent_span_id.hex(), "kind": span.kind,
                              "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                              "links": [link.span_id.hex() for link in span.links], "resource": resource})
    return spans


@pytest.mark.server
def test_gunicorn_workers_export_over_otlp_http_with_the_callers_trace(tmp_path, tiny_checkpoint):
    import numpy as np
    import tritonclient.grpc as grpcclient

    receiver = Receiver()
    config = write_config(tmp_path, [tiny_model_config(tiny_checkpoint)])
    log = tmp_path / "gunicorn.log"
    grpc_port = free_port()
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2", "SERVE_GRPC_PORT": str(grpc_port),
                     "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "serve-under-test",
                     "OTEL_BSP_SCHEDULE_DELAY": "60000"}, log)  # exported when the workers stop, if not before
    try:
        for i in range(12):  # a fresh connection each time, so both workers take requests
            response = requests.post(f"{server.url}/predictions/tiny", data=image_bytes(), timeout=10, headers={
                "Content-Type": "image/png", "Connection": "close", "traceparent": PARENT, "X-Request-ID": f"h{i}"})
            assert response.status_code == 200
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([image_bytes()], dtype=np.object_))
        client.infer("tiny", [image], headers={"traceparent": PARENT})
        answered = []
        client.start_stream(lambda result, error: answered.append(error), headers={"traceparent": PARENT})
        for i in range(2):
            client.async_stream_infer("tiny", [image], request_id=f"s{i}")
        client.stop_stream()  # waits for the answers
        assert answered == [None, None]
        client.close()
        assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0  # a graceful stop: each worker flushes its spans on exit
        receiver.close()
    spans = receiver.spans
    servers = [s for s in spans if s["kind"] == 2]  # SPAN_KIND_SERVER
    http = [s for s in servers if s["name"] == "POST /predictions/<name>"]
    unary = [s for s in servers if s["name"] == "inference.GRPCInferenceService/ModelInfer"]
    stream = [s for s in servers if s["name"] == "inference.GRPCInferenceService/ModelStreamInfer"]
    assert len(http) == 12 and len(unary) == 1 and len(stream) == 2
    assert len(servers) == 15  # probes and /metrics not traced
    assert {s["trace_id"] for s in spans} == {TRACE_ID}  # every span in the caller's trace
    assert all(s["parent"] == "00f067aa0ba902b7" for s in servers)
    assert {s["resource"]["service.name"] for s in spans} == {"serve-under-test"}
    workers = {s["resource"]["process.pid"] for s in servers}
    assert 1 <= len(workers) <= 2 and server.proc.pid not in workers  # made in the workers, never the master
    forwards = {s["span_id"]: s for s in spans if s["name"] == "forward"}
    assert all(f["attributes"]["serve.model"] == "tiny" for f in forwards.values())
    served = {link for f in forwards.values() for link in f["links"]}
    for request in servers:  # the two stream requests may share a batch: its forward is under one of them
        stages = sorted(s["name"] for s in spans if s["parent"] == request["span_id"] and s["name"] != "forward")
        assert stages == sorted(set(STAGES) - {"forward"}), (request["name"], stages)
        (queue,) = [s for s in spans if s["parent"] == request["span_id"] and s["name"] == "queue"]
        assert queue["links"][0] in forwards and request["span_id"] in served
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    traced = [line for line in lines if line.get("request_id", "").startswith("h")]
    assert len(traced) == 12 and {line["trace_id"] for line in traced} == {TRACE_ID}
    assert {line["span_id"] for line in traced} == {s["span_id"] for s in http}
