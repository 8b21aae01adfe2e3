"""The Open Inference Protocol over gRPC: the official tritonclient.grpc, unchanged, against a real gunicorn
with 2 workers on 127.0.0.1; every task answers what REST V2 answers for the same photo; typed and raw
inputs; streams in order; deadlines, keys, TLS, health, big messages, a graceful stop mid-stream."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as triton_pb2
import tritonclient.http as httpclient
import yaml
from certs import TestCA
from conftest import expected_probs, image_bytes, metric, tiny_model_config, tiny_net, write_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servers import ROOT, Server, free_port
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from models.bright import BrightBoxDetector, BrightSegmenter
from serve.errors import (
    BatchTimeoutError,
    ForbiddenError,
    ImageTooLargeError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnauthorizedError,
)
from serve.grpc_door import SERVICE, grpc_status
from serve.proto import generate, open_inference_pb2

pytestmark = pytest.mark.server

PLAIN = {"mean": [0, 0, 0], "std": [1, 1, 1]}
TASKS = {"tiny": "classify", "boxes": "detect", "regions": "segment", "colours": "embed"}
KEYS = {"web": ("web-key-0000000000000001", ["inference"]), "prom": ("prom-key-000000000000001", ["metrics"])}


def model_specs(folder) -> list[dict]:
    torch.save(BrightBoxDetector().state_dict(), folder / "detector.pth")
    torch.save(BrightSegmenter().state_dict(), folder / "segmenter.pth")
    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    return [
        tiny_model_config(folder / "tiny.pth"),
        {"name": "boxes", "task": "detect", "runtime": "eager", "architecture": "models.bright:BrightBoxDetector",
         "checkpoint": str(folder / "detector.pth"), "device": "cpu", "preprocess": PLAIN},
        {"name": "regions", "task": "segment", "runtime": "eager", "architecture": "models.bright:BrightSegmenter",
         "checkpoint": str(folder / "segmenter.pth"), "device": "cpu", "preprocess": {"resize": 40, "crop": 40, **PLAIN}},
        {**tiny_model_config(folder / "tiny.pth"), "name": "colours", "task": "embed"},
    ]


class GrpcServer:
    """gunicorn with 2 workers serving gRPC on a port of its own beside HTTP."""

    def __init__(self, folder, models, tls: dict | None = None, **server):
        self.grpc_port = free_port()
        self.log = folder / "gunicorn.log"
        config = write_config(folder, models, **server)
        self.http = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2", "SERVE_GRPC_PORT": str(self.grpc_port)},
                           self.log, inherit_settings=False, tls=tls)
        self.target = f"127.0.0.1:{self.grpc_port}"

    def access_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith('{"ts"')]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc")
    running = GrpcServer(folder, model_specs(folder), max_images_per_request=4)
    yield running
    assert running.http.stop() == 0


@pytest.fixture(scope="module")
def triton(server):
    client = grpcclient.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def rest(server):
    client = httpclient.InferenceServerClient(server.http.url.removeprefix("http://"), network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    """Triton's own generated stub (tritonclient ships it) for messages tritonclient's API doesn't build."""
    with grpc.insecure_channel(server.target) as channel:
        yield triton_grpc.GRPCInferenceServiceStub(channel)


def images_input(module, images: list[bytes]):
    return module.InferInput("image", [len(images)], "BYTES").set_data_from_numpy(np.array(images, dtype=np.object_))


def code_of(exc: InferenceServerException) -> str:
    return exc.status()  # "StatusCode.NOT_FOUND"


# --- the protocol's messages ----------------------------------------------------------------------------


def fields(descriptor) -> dict:
    """A message's wire shape: each field's number, type, label and (for messages) nested shape."""
    shape = {}
    for f in descriptor.fields:
        nested = fields(f.message_type) if f.message_type is not None else None
        shape[f.name] = (f.number, f.type, f.is_repeated, nested)
    return shape


def test_messages_are_wire_compatible_with_tritonclients():
    ours = open_inference_pb2.DESCRIPTOR.message_types_by_name
    triton = triton_pb2.DESCRIPTOR.message_types_by_name
    for name, descriptor in ours.items():
        assert fields(descriptor) == fields(triton[name]), name
    service = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == SERVICE


def test_generated_module_is_current():
    assert generate.main(["--check"]) == 0, "run python -m serve.proto.generate"


def test_the_master_never_imports_grpc(tmp_path):
    """gunicorn's master reads gunicorn_conf.py and preloads the app, then forks: grpcio must not be in it."""
    torch.save(tiny_net().state_dict(), tmp_path / "tiny.pth")
    config = write_config(tmp_path, [tiny_model_config(tmp_path / "tiny.pth")])
    code = ("import sys, runpy; runpy.run_path('serve/gunicorn_conf.py'); from serve.app import create_app; "
            "create_app(); print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "SERVE_CONFIG": str(config), "SERVE_GRPC_PORT": str(free_port()),
                              "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("exc, code, metadata", [
    (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, ()),
    (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND, ()),
    (ImageTooLargeError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, ()),
    (OverloadedError("x", retry_after_s=3), grpc.StatusCode.UNAVAILABLE, (("retry-after", "3"),)),
    (BatchTimeoutError("x"), grpc.StatusCode.DEADLINE_EXCEEDED, (("retry-after", "1"),)),
    (UnauthorizedError("x", "Bearer"), grpc.StatusCode.UNAUTHENTICATED, (("www-authenticate", "Bearer"),)),
    (ForbiddenError("x", "Bearer"), grpc.StatusCode.PERMISSION_DENIED, (("www-authenticate", "Bearer"),)),
])
def test_errors_map_to_status_codes(exc, code, metadata):
    assert grpc_status(exc) == (code, metadata)


# --- the same answers as REST -----------------------------------------------------------------------------


def test_health_metadata_and_repository(triton, server):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("tiny")
    assert triton.get_server_metadata(as_json=True)["name"] == "torch-serve"
    meta = triton.get_model_metadata("tiny", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("input", "FP32", ["-1", "3", "8", "8"]), ("image", "BYTES", ["-1"])]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "3"]}]
    index = triton.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {(name, "1", "READY") for name in TASKS}
    with pytest.raises(InferenceServerException) as missing:
        triton.is_model_ready("nope")
    assert code_of(missing.value) == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", SERVICE):
            assert check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_answers_what_rest_v2_answers_for_the_cat(triton, rest, name, cat_jpeg):
    outputs = [o["name"] for o in rest.get_model_metadata(name)["outputs"]]
    over_grpc = triton.infer(name, [images_input(grpcclient, [cat_jpeg])], request_id="cat-1")
    over_rest = rest.infer(name, [images_input(httpclient, [cat_jpeg])])
    for output in outputs:
        assert np.array_equal(over_grpc.as_numpy(output), over_rest.as_numpy(output)), output
    response = over_grpc.get_response()
    assert (response.model_name, response.model_version, response.id) == (name, "1", "cat-1")
    assert response.parameters["model_version_tag"].string_param.startswith("1 ")


def test_classification_parameter_and_fp32_input(triton, rest, cat_jpeg):
    asked = [grpcclient.InferRequestedOutput("probabilities", class_count=2)]
    top = triton.infer("tiny", [images_input(grpcclient, [cat_jpeg])], outputs=asked).as_numpy("probabilities")
    rest_top = rest.infer("tiny", [images_input(httpclient, [cat_jpeg])],
                          outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2)]).as_numpy("probabilities")
    assert top.tolist() == rest_top.tolist() and top.shape == (1, 2)
    batch = np.full((2, 3, 8, 8), 0.5, np.float32)
    batch[1, 0] = 1.0
    tensor = grpcclient.InferInput("input", [2, 3, 8, 8], "FP32").set_data_from_numpy(batch)
    probs = triton.infer("tiny", [tensor], priority=3, timeout=5_000_000).as_numpy("probabilities")
    expected = (torch.from_numpy(batch).mean((2, 3)) * 2 + 1).softmax(-1).numpy()
    assert np.allclose(probs, expected, atol=1e-6)
    embedded = triton.infer("colours", [tensor]).as_numpy("embedding")
    assert np.allclose(embedded, torch.from_numpy(batch).mean((2, 3)).numpy() * 2 + 1, atol=1e-6)


def typed_request(model: str, name: str, datatype: str, shape: list[int], **contents) -> triton_pb2.ModelInferRequest:
    request = triton_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape, contents=triton_pb2.InferTensorContents(**contents))
    return request


def test_typed_contents_answer_as_raw_inputs(stub, triton):
    images = [image_bytes((255, 0, 0)), image_bytes((0, 0, 255))]
    answer = stub.ModelInfer(typed_request("tiny", "image", "BYTES", [2], bytes_contents=images))
    assert len(answer.raw_output_contents) == 1 and not answer.outputs[0].HasField("contents")
    probs = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(list(answer.outputs[0].shape))
    assert np.array_equal(probs, triton.infer("tiny", [images_input(grpcclient, images)]).as_numpy("probabilities"))
    assert np.allclose(probs, [expected_probs((255, 0, 0)).numpy(), expected_probs((0, 0, 255)).numpy()], atol=1e-6)
    batch = np.full((1, 3, 8, 8), 0.25, np.float32)
    answer = stub.ModelInfer(typed_request("colours", "input", "FP32", [1, 3, 8, 8], fp32_contents=batch.ravel().tolist()))
    assert np.allclose(np.frombuffer(answer.raw_output_contents[0], "<f4"), [1.5, 1.5, 1.5])


@pytest.mark.parametrize("mutate, code, message", [
    (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
    (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "model 'tiny' has no version '9'"),
    (lambda r: setattr(r.inputs[0], "name", "pixels"), grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference input 'pixels'"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP32"), grpc.StatusCode.INVALID_ARGUMENT, "has datatype FP32; expected BYTES"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), grpc.StatusCode.INVALID_ARGUMENT, "1 elements; its shape says 3"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 5), grpc.StatusCode.INVALID_ARGUMENT, "5 images in one request; the limit is 4"),
    (lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b"not an image"), grpc.StatusCode.INVALID_ARGUMENT,
     "not an image"),
    (lambda r: r.raw_input_contents.append(b"\x00"), grpc.StatusCode.INVALID_ARGUMENT, "both contents and raw_input_contents"),
    (lambda r: r.inputs[0].ClearField("contents"), grpc.StatusCode.INVALID_ARGUMENT, "no contents and no raw_input_contents"),
    (lambda r: r.inputs.add(name="image", datatype="BYTES", shape=[1]), grpc.StatusCode.INVALID_ARGUMENT,
     "expected exactly one input"),
    (lambda r: r.outputs.add(name="scores"), grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference output 'scores'"),
    (lambda r: r.parameters["timeout"].CopyFrom(triton_pb2.InferParameter(string_param="soon")),
     grpc.StatusCode.INVALID_ARGUMENT, "'timeout' must be a positive integer"),
])
def test_bad_requests_get_a_status_and_a_clear_message(stub, mutate, code, message):
    request = typed_request("tiny", "image", "BYTES", [1], bytes_contents=[image_bytes()])
    mutate(request)
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(request)
    assert failed.value.code() == code
    assert message in failed.value.details()


def test_classification_on_detect_is_refused(triton, cat_jpeg):
    with pytest.raises(InferenceServerException) as refused:
        triton.infer("boxes", [images_input(grpcclient, [cat_jpeg])],
                     outputs=[grpcclient.InferRequestedOutput("boxes", class_count=1)])
    assert code_of(refused.value) == "StatusCode.INVALID_ARGUMENT" and "applies to class scores only" in refused.value.message()


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_a_20_mb_photo_and_a_message_over_the_limit(triton, stub):
    photo = noise_png(2600)
    assert 20_000_000 < len(photo) < 32 * 2**20
    probs = triton.infer("tiny", [images_input(grpcclient, [photo])], client_timeout=60).as_numpy("probabilities")
    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1, atol=1e-5)
    request = typed_request("tiny", "image", "BYTES", [1], bytes_contents=[b"\xff" * (32 * 2**20 + 1)])
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def slow_png() -> bytes:
    """36 Mpx in 1.2 MB: it arrives at once and takes about half a second to decode."""
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    pixels = np.repeat((np.add.outer(ramp, ramp) / 2).astype(np.uint8)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_the_deadline_is_the_requests_deadline(triton, server):
    """The server gives up when the gRPC deadline passes: the slow image's decode outlasts 200 ms, and the
    forward it would have queued is refused instead of run (the access line says 503, not 200)."""
    with pytest.raises(InferenceServerException) as late:
        triton.infer("tiny", [images_input(grpcclient, [slow_png()])], request_id="late-1", client_timeout=0.2)
    assert code_of(late.value) == "StatusCode.DEADLINE_EXCEEDED"
    assert triton.is_server_ready()  # the worker is fine
    line = wait_for(lambda: [x for x in server.access_lines() if x["request_id"] == "late-1"])[0]
    assert line["status"] == 503


def wait_for(check, timeout_s: float = 30.0):
    """Read back until `check` finds something (a server's log line written after the client's answer)."""
    stop = threading.Event()
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    try:
        while not (result := check()):
            if stop.wait(0.05):
                raise AssertionError(f"nothing found in {timeout_s} s")
        return result
    finally:
        timer.cancel()


# --- streaming ------------------------------------------------------------------------------------------


class Collected:
    """A stream's callback: results in arrival order, and an event once `expected` arrived."""

    def __init__(self, expected: int):
        self.expected = expected
        self.items: list = []
        self.lock = threading.Lock()
        self.all_in = threading.Event()

    def __call__(self, result, error):
        with self.lock:
            self.items.append(error if error is not None else result)
            if len(self.items) >= self.expected:
                self.all_in.set()


def colour(i: int) -> tuple[int, int, int]:
    return (i * 5 % 256, 255 - i * 5 % 256, i * 3 % 256)


def send_frames(client, frames: range, bad: int | None = None) -> None:
    for i in frames:
        data = b"not an image" if i == bad else image_bytes(colour(i))
        client.async_stream_infer("tiny", [images_input(grpcclient, [data])], request_id=str(i))


def test_a_stream_of_50_frames_is_answered_in_order(triton):
    collected = Collected(50)
    triton.start_stream(collected)
    try:
        send_frames(triton, range(50), bad=25)
        assert collected.all_in.wait(60)
    finally:
        triton.stop_stream()
    for i, item in enumerate(collected.items):
        if i == 25:
            assert isinstance(item, InferenceServerException) and "not an image" in item.message()
            continue
        assert item.get_response().id == str(i)
        assert np.allclose(item.as_numpy("probabilities")[0], expected_probs(colour(i)).numpy(), atol=1e-5)


def test_grpc_calls_are_counted_and_logged(triton, server):
    before = requests.get(f"{server.http.url}/metrics", timeout=10).text
    triton.infer("tiny", [images_input(grpcclient, [image_bytes()])], request_id="counted-1")
    after = requests.get(f"{server.http.url}/metrics", timeout=10).text
    count = lambda text: metric(text, "serve_requests_total", 0.0, model="tiny", status="200", protocol="grpc")
    assert count(after) == count(before) + 1
    line = wait_for(lambda: [x for x in server.access_lines() if x["request_id"] == "counted-1"])[0]
    assert line["path"] == f"/{SERVICE}/ModelInfer" and line["protocol"] == "grpc" and line["batch_size"] == 1
    assert line["model"] == "tiny" and line["status"] == 200 and line["remote"].startswith("ipv4:127.0.0.1")


# --- keys, TLS, admission -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc-tls")
    ca = TestCA(folder)
    issued = ca.issue("server")
    keys = folder / "api-keys.yaml"
    keys.write_text(yaml.safe_dump({name: {"key": key, "scopes": scopes} for name, (key, scopes) in KEYS.items()}))
    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    running = GrpcServer(folder, [tiny_model_config(folder / "tiny.pth")], tls={"verify": str(ca.cert)},
                         api_keys_file=str(keys), tls_cert_file=str(issued.cert), tls_key_file=str(issued.key),
                         max_queue=2, max_images_per_request=4)
    yield running, ca
    assert running.http.stop() == 0


def test_tls_with_a_verifying_client_and_keys_from_metadata(secured, tmp_path):
    server, ca = secured
    client = grpcclient.InferenceServerClient(server.target, ssl=True, root_certificates=str(ca.cert))
    image = [images_input(grpcclient, [image_bytes()])]
    web, prom = KEYS["web"][0], KEYS["prom"][0]
    try:
        assert client.is_server_live()  # open, as /v2/health/live
        with pytest.raises(InferenceServerException) as missing:
            client.infer("tiny", image)
        assert code_of(missing.value) == "StatusCode.UNAUTHENTICATED" and "needs an API key" in missing.value.message()
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("tiny", image, headers={"authorization": "Bearer not-a-key-0000000000"})
        assert code_of(wrong.value) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as scope:
            client.infer("tiny", image, headers={"x-api-key": prom})
        assert code_of(scope.value) == "StatusCode.PERMISSION_DENIED" and "lacks the 'inference' scope" in scope.value.message()
        for headers in ({"authorization": f"Bearer {web}"}, {"x-api-key": web}):
            probs = client.infer("tiny", image, headers=headers).as_numpy("probabilities")
            assert np.allclose(probs[0], expected_probs((255, 0, 0)).numpy(), atol=1e-6)
        keyed = [line for line in server.access_lines() if line["protocol"] == "grpc" and line["key"] == "web"]
        assert keyed
    finally:
        client.close()
    stranger = TestCA(tmp_path, "another CA")
    untrusting = grpcclient.InferenceServerClient(server.target, ssl=True, root_certificates=str(stranger.cert))
    try:
        with pytest.raises(InferenceServerException) as refused:
            untrusting.is_server_live()
        assert code_of(refused.value) == "StatusCode.UNAVAILABLE"
    finally:
        untrusting.close()


def test_a_refusal_by_admission_is_unavailable_with_retry_after(secured):
    server, ca = secured
    with open(ca.cert, "rb") as f:
        channel = grpc.secure_channel(server.target, grpc.ssl_channel_credentials(f.read()))
    with channel:
        request = typed_request("tiny", "image", "BYTES", [3], bytes_contents=[image_bytes()] * 3)
        with pytest.raises(grpc.RpcError) as refused:
            triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("x-api-key", KEYS["web"][0]),))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "limit 2" in refused.value.details()
    trailing = dict(refused.value.trailing_metadata())
    assert int(trailing["retry-after"]) >= 1 and trailing["x-request-id"]


# --- stopping -------------------------------------------------------------------------------------------


def test_sigterm_mid_stream_lets_the_stream_finish(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "tiny.pth")
    server = GrpcServer(tmp_path, [tiny_model_config(tmp_path / "tiny.pth")])
    client = grpcclient.InferenceServerClient(server.target)
    collected, first = Collected(50), Collected(10)
    try:
        client.start_stream(lambda result, error: (collected(result, error), first(result, error)))
        send_frames(client, range(10))
        assert first.all_in.wait(30)  # the stream is open in a worker and answering
        server.http.proc.send_signal(signal.SIGTERM)
        send_frames(client, range(10, 50))
        assert collected.all_in.wait(30)
        client.stop_stream()
        assert [item.get_response().id for item in collected.items] == [str(i) for i in range(50)]
        assert server.http.proc.wait(timeout=40) == 0
    finally:
        client.close()
        server.http.stop()
    log = server.log.read_text()
    assert "Traceback" not in log
