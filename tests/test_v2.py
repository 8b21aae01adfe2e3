"""The Open Inference Protocol (KServe V2) API: the official tritonclient against a live HTTP server, exact answers.

tritonclient talks to a real gunicorn on 127.0.0.1 (the same wire code users get, serve/wire.py
included); the raw-protocol tests use the Flask test client. Both serve the tiny model
(logits = 2 * channel means + 1) from one checkpoint, so every probability can be computed here.
"""
from __future__ import annotations

import base64
import gzip
import json
import struct
import threading

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from conftest import LABELS, expected_probs, image_bytes, metric, tiny_model_config, tiny_net, write_config
from servers import Server
from tritonclient.utils import InferenceServerException

from serve.app import create_app
from serve.config import build_config

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def v2_config(tmp_path_factory) -> dict:
    checkpoint = tmp_path_factory.mktemp("v2") / "tiny.pth"
    torch.save(tiny_net().state_dict(), checkpoint)
    return {"models": [tiny_model_config(checkpoint)], "server": {"max_images_per_request": MAX_IMAGES}}


@pytest.fixture(scope="module")
def v2_app(v2_config):
    app = create_app(build_config(v2_config))
    yield app
    app.extensions["serve"].close()


@pytest.fixture(scope="module")
def server_url(v2_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2-gunicorn")
    config = write_config(folder, v2_config["models"], **v2_config["server"])
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1"}, folder / "gunicorn.log",
                    inherit_settings=False)
    yield server.url.removeprefix("http://")
    assert server.stop() == 0


@pytest.fixture(scope="module")
def triton(server_url):
    client = httpclient.InferenceServerClient(server_url, network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture
def client(v2_app):
    return v2_app.test_client()


def dyadic_batch(n: int, seed: int = 0) -> np.ndarray:
    """Values k/16: every sum over 64 pixels is exact in float32, whatever order the model adds them in."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, size=(n, 3, 8, 8)) / 16).astype(np.float32)


def expected_fp32(batch: np.ndarray) -> np.ndarray:
    """TinyNet by hand: softmax(2 * mean over H, W + 1), for the same [N, 3] batch shape."""
    logits = torch.from_numpy(batch).double().mean((2, 3)).float() * 2 + 1
    return logits.softmax(-1).numpy()


def expected_images(colours) -> np.ndarray:
    return torch.stack([expected_probs(c) for c in colours]).numpy()


def fp32_input(batch: np.ndarray, binary: bool, name: str = "input") -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(batch.shape), "FP32")
    return tensor.set_data_from_numpy(batch, binary_data=binary)


def bytes_input(images: list[bytes], binary: bool, shape=None) -> httpclient.InferInput:
    elements = images if binary else [base64.b64encode(b) for b in images]
    array = np.array(elements, dtype=np.object_).reshape(shape or [len(images)])
    return httpclient.InferInput("image", list(array.shape), "BYTES").set_data_from_numpy(array, binary_data=binary)


def classification_strings(probs: np.ndarray, k: int) -> list[list[str]]:
    """Triton's classification elements: "%f" of the probability, the index, the label; best first."""
    rows = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        rows.append([f"{float(row[i]):f}:{i}:{LABELS[i]}" for i in order])
    return rows


# --- health and metadata through tritonclient ----------------------------------------------------------


@pytest.mark.server
def test_server_live_and_ready(triton):
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True


@pytest.mark.server
def test_server_metadata(triton):
    meta = triton.get_server_metadata()
    assert meta == {"name": "torch-serve", "version": meta["version"],
                    "extensions": ["binary_tensor_data", "classification"]}
    assert isinstance(meta["version"], str) and meta["version"]


@pytest.mark.server
def test_model_metadata(triton):
    expected = {
        "name": "tiny",
        "versions": ["1"],
        "platform": "pytorch",
        "parameters": {"task": "classify"},
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert triton.get_model_metadata("tiny") == expected
    assert triton.get_model_metadata("tiny", model_version="1") == expected


@pytest.mark.server
def test_model_ready(triton):
    assert triton.is_model_ready("tiny") is True
    assert triton.is_model_ready("tiny", model_version="1") is True
    assert triton.is_model_ready("nope") is False
    assert triton.is_model_ready("tiny", model_version="2") is False


# --- inference through tritonclient ----------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_fp32_tensor_inference_is_exact(triton, binary_in, binary_out):
    batch = dyadic_batch(3, seed=int(binary_in) * 2 + int(binary_out))
    result = triton.infer(
        "tiny", [fp32_input(batch, binary_in)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)],
        request_id="req-7",
    )
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    np.testing.assert_array_equal(probs, expected_fp32(batch))
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("tiny", "1", "req-7")
    [output] = response["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [3, 3])
    assert ("parameters" in output) is binary_out and ("data" in output) is not binary_out


@pytest.mark.server
def test_fp32_with_default_outputs_and_a_version(triton):
    """No outputs named: tritonclient asks for every output in binary (binary_data_output)."""
    batch = dyadic_batch(1, seed=9)
    result = triton.infer("tiny", [fp32_input(batch, True)], model_version="1")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected_fp32(batch))
    assert result.get_output("probabilities")["parameters"] == {"binary_data_size": 12}
    assert "id" not in result.get_response()


def test_fp32_forward_runs_on_the_batcher_thread(client, v2_app):
    threads = []
    module = v2_app.extensions["serve"].table.served("tiny").predictor.loaded.module
    handle = module.register_forward_pre_hook(lambda m, args: threads.append(threading.current_thread().name))
    try:
        assert client.post("/v2/models/tiny/infer", json=fp32_body()).status_code == 200
    finally:
        handle.remove()
    assert threads == ["inference"]


def test_fp32_batches_keep_the_models_max_batch_size_and_count_per_image(tiny_checkpoint, make_app):
    app = make_app(tiny_model_config(tiny_checkpoint, max_batch_size=2), max_images_per_request=5)
    service = app.extensions["serve"]
    sizes, depths = [], []
    module = service.table.served("tiny").predictor.loaded.module
    module.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    metrics = service.scheduler.metrics
    observe = metrics.observe_batch
    metrics.observe_batch = lambda *a: (depths.append(a[-1]), observe(*a))
    batch = dyadic_batch(5, seed=3)
    response = app.test_client().post("/v2/models/tiny/infer", json=fp32_body(
        shape=list(batch.shape), data=batch.flatten().tolist()))
    assert response.status_code == 200, response.json
    [output] = response.json["outputs"]
    np.testing.assert_array_equal(np.array(output["data"], dtype=np.float32).reshape(5, 3), expected_fp32(batch))
    # As the model's lane batches images (how many a batch gathers depends on when they were
    # queued), never one forward of 5; the queue depth counts the images still waiting.
    assert sum(sizes) == 5 and max(sizes) <= 2
    assert depths == [5 - sum(sizes[:i + 1]) for i in range(len(sizes))]


@pytest.mark.server
def test_fp32_gzip_request(triton):
    batch = dyadic_batch(2, seed=3)
    result = triton.infer("tiny", [fp32_input(batch, True)], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected_fp32(batch))


COLOURS = [(255, 0, 0), (0, 255, 255), (0, 0, 255), (255, 255, 0)]


@pytest.mark.server
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-base64-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_bytes_image_inference_is_exact(triton, binary_in, binary_out):
    images = [image_bytes(c, fmt=fmt) for c, fmt in zip(COLOURS, ["PNG", "BMP", "PNG", "TIFF"])]
    result = triton.infer(
        "tiny", [bytes_input(images, binary_in)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)],
    )
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected_images(COLOURS))


@pytest.mark.server
def test_bytes_shape_n_by_1(triton):
    images = [image_bytes(COLOURS[1]), image_bytes(COLOURS[2])]
    result = triton.infer("tiny", [bytes_input(images, True, shape=[2, 1])])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected_images(COLOURS[1:3]))


@pytest.mark.server
def test_bytes_matches_the_predictions_route(triton, client):
    """Any colour: the V2 answer is the one POST /predictions gives (same decode, same batcher)."""
    png = image_bytes((10, 20, 250))
    probs = triton.infer("tiny", [bytes_input([png], True)]).as_numpy("probabilities")[0]
    answer = client.post("/predictions/tiny", data=png, content_type="image/png").json["predictions"]
    assert [p["label"] for p in answer] == [LABELS[i] for i in np.argsort(-probs)]
    assert [p["probability"] for p in answer] == [round(float(p), 6) for p in sorted(probs, reverse=True)]


@pytest.mark.server
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_classification_extension(triton, binary_out):
    batch = dyadic_batch(2, seed=5)
    result = triton.infer(
        "tiny", [fp32_input(batch, True)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_out, class_count=2)],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    as_text = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in top.tolist()]
    assert as_text == classification_strings(expected_fp32(batch), 2)
    output = result.get_output("probabilities")
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 2])


@pytest.mark.server
def test_classification_of_images_and_count_above_classes(triton):
    result = triton.infer(
        "tiny", [bytes_input([image_bytes(COLOURS[0]), image_bytes(COLOURS[2])], True)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=10)],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    assert top.tolist() == classification_strings(expected_images([COLOURS[0], COLOURS[2]]), 3)
    # By hand: red is [3, 1, 1] in logits; e^3 / (e^3 + 2e) = 0.786986; green and blue tie, lower index first.
    assert top[0].tolist() == ["0.786986:0:red", "0.106507:1:green", "0.106507:2:blue"]


# --- errors through tritonclient -------------------------------------------------------------------------


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


@pytest.mark.server
def test_unknown_model_is_404(triton):
    status, message = status_of(lambda: triton.infer("nope", [fp32_input(dyadic_batch(1), True)]))
    assert status == "404" and "no model named 'nope'" in message
    assert status_of(lambda: triton.get_model_metadata("nope"))[0] == "404"
    assert status_of(lambda: triton.get_model_metadata("tiny", model_version="2"))[0] == "404"
    assert status_of(lambda: triton.infer("tiny", [fp32_input(dyadic_batch(1), True)], model_version="3"))[0] == "404"


@pytest.mark.server
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_wrong_shape_is_400(triton, binary):
    batch = np.zeros((1, 3, 4, 4), dtype=np.float32)
    status, message = status_of(lambda: triton.infer("tiny", [fp32_input(batch, binary)]))
    assert status == "400" and "[1, 3, 4, 4]" in message and "[N, 3, 8, 8]" in message


@pytest.mark.server
@pytest.mark.parametrize("datatype, dtype", [("FP64", np.float64), ("INT32", np.int32), ("UINT8", np.uint8)])
def test_wrong_datatype_is_400(triton, datatype, dtype):
    tensor = httpclient.InferInput("input", [1, 3, 8, 8], datatype)
    tensor.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=dtype), binary_data=True)
    status, message = status_of(lambda: triton.infer("tiny", [tensor]))
    assert status == "400" and f"datatype {datatype}; expected FP32" in message


@pytest.mark.server
def test_bad_inputs_and_outputs_are_400(triton):
    def infer(inputs, outputs=None):
        return status_of(lambda: triton.infer("tiny", inputs, outputs=outputs))

    status, message = infer([fp32_input(dyadic_batch(1), True, name="pixels")])
    assert status == "400" and "unexpected inference input 'pixels'" in message
    status, message = infer([fp32_input(dyadic_batch(MAX_IMAGES + 1), True)])
    assert status == "400" and f"limit is {MAX_IMAGES}" in message
    status, message = infer([fp32_input(dyadic_batch(1), True)], [httpclient.InferRequestedOutput("logits")])
    assert status == "400" and "unexpected inference output 'logits'" in message
    status, message = infer([bytes_input([image_bytes(), b"garbage"], True)])
    assert status == "400" and message.startswith("image 2 of 2:")
    status, message = infer([fp32_input(dyadic_batch(1), True), bytes_input([image_bytes()], True)])
    assert status == "400" and "exactly one input" in message


# --- raw JSON shapes through the test client -------------------------------------------------------------


def test_raw_health_and_metadata_shapes(client):
    assert (client.get("/v2/health/live").status_code, client.get("/v2/health/live").json) == (200, {"live": True})
    assert client.get("/v2/health/ready").json == {"ready": True}
    assert client.get("/v2/models/tiny/ready").json == {"name": "tiny", "ready": True}
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    assert set(client.get("/v2").json) == {"name", "version", "extensions"}


def test_raw_json_inference_shape(client):
    batch = dyadic_batch(2, seed=11)
    body = {
        "id": "abc",
        "inputs": [{"name": "input", "shape": [2, 3, 8, 8], "datatype": "FP32", "data": batch.tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.json == {
        "model_name": "tiny", "model_version": "1", "id": "abc",
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [2, 3],
                     "data": expected_fp32(batch).ravel().tolist()}],
    }


def test_raw_binary_request_and_answer(client):
    """The binary extension by hand: JSON header, then the input's bytes; the answer split the same way."""
    png = image_bytes(COLOURS[2])
    head = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(png)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = client.post(
        "/v2/models/tiny/versions/1/infer", data=head + struct.pack("<I", len(png)) + png,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.data[:length])
    assert answer["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [1, 3],
                                  "parameters": {"binary_data_size": 12}}]
    np.testing.assert_array_equal(np.frombuffer(response.data[length:], "<f4"), expected_probs(COLOURS[2]).numpy())


def test_raw_binary_elements_past_the_shape_are_not_read(client):
    data = b"".join(struct.pack("<I", 0) for _ in range(10_000))  # 10,000 empty elements for a shape of [1]
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    response = client.post("/v2/models/tiny/infer", data=head + data,
                           headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 400 and "more than 1 elements; its shape says 1" in response.json["error"]


def test_raw_gzip_body(client):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image_bytes()).decode()]}]}
    response = client.post("/v2/models/tiny/infer", data=gzip.compress(json.dumps(body).encode()),
                           headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.json["outputs"][0]["data"] == expected_probs((255, 0, 0)).tolist()


def v2_error(response) -> tuple[int, str]:
    assert response.is_json, response.data[:200]
    assert set(response.json) == {"error"} and isinstance(response.json["error"], str)
    return response.status_code, response.json["error"]


def fp32_body(**changes) -> dict:
    tensor = {"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}
    tensor.update(changes)
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    "kwargs, status, needle",
    [
        ({"data": b"{not json"}, 400, "not valid JSON"),
        ({"data": b""}, 400, "body is empty"),
        ({"json": [1, 2]}, 400, "JSON object"),
        ({"json": {"inputs": []}}, 400, "non-empty list"),
        ({"json": fp32_body(data=["a"] * 192)}, 400, "numbers only"),
        ({"json": fp32_body(data=[0.5] * 191)}, 400, "191 values"),
        ({"json": fp32_body(data=[[0.5], [0.5, 0.5]])}, 400, "ragged"),
        ({"json": fp32_body(data=None)}, 400, "must be a list"),
        ({"json": fp32_body(shape=[0, 3, 8, 8], data=[])}, 400, "holds no image"),
        ({"json": fp32_body(shape="1,3,8,8")}, 400, "non-negative integers"),
        ({"json": fp32_body(parameters={"shared_memory_region": "r"})}, 400, "shared memory"),
        ({"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}}, 400, "base64"),
        ({"json": {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AAAA"]}]}}, 400, "1 elements"),
        # The count is checked before any element is decoded.
        ({"json": {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["%%%", "AAAA", "AAAA"]}]}},
         400, "3 elements; its shape says 2"),
        ({"json": {"inputs": [{"name": "image", "shape": [1, 3], "datatype": "BYTES", "data": ["AAAA"]}]}}, 400, "[N] or [N, 1]"),
        ({"json": {**fp32_body(), "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}]}},
         400, "non-negative integer"),
        ({"json": {**fp32_body(), "id": 5}}, 400, "'id' must be a string"),
        ({"data": b"{}", "headers": {"Inference-Header-Content-Length": "9"}}, 400, "outside the 2-byte body"),
        ({"data": b"{}", "headers": {"Content-Encoding": "br"}}, 415, "Content-Encoding 'br'"),
        ({"data": b"not gzip", "headers": {"Content-Encoding": "gzip"}}, 400, "can't be decompressed"),
    ],
)
def test_raw_bad_requests(client, kwargs, status, needle):
    got_status, message = v2_error(client.post("/v2/models/tiny/infer", **kwargs))
    assert got_status == status and needle in message


def test_raw_unclaimed_binary_data_is_400(client):
    head = json.dumps(fp32_body()).encode()
    response = client.post("/v2/models/tiny/infer", data=head + b"xxxx",
                           headers={"Inference-Header-Content-Length": str(len(head))})
    assert v2_error(response) == (400, "4 bytes of binary data after the inputs are not claimed by any input")


def test_raw_unknown_routes_and_methods(client):
    assert v2_error(client.get("/v2/models/nope"))[0] == 404
    assert v2_error(client.get("/v2/models/tiny/versions/2/ready"))[0] == 404
    assert v2_error(client.get("/v2/no/such/route"))[0] == 404
    response = client.get("/v2/models/tiny/infer")
    assert v2_error(response)[0] == 405 and response.headers["Allow"] == "POST"
    response = client.post("/v2/health/live")
    assert v2_error(response)[0] == 405 and response.headers["Allow"] == "GET, HEAD"
    # Routes outside /v2 keep the server's own error shape.
    assert client.get("/no/such/route").json["error"]["code"] == "not_found"


def test_raw_overloaded_is_503(make_app):
    app = make_app(max_queue=1)
    release = threading.Event()
    blocker = app.extensions["serve"].scheduler.batcher.call(release.wait, 10)  # the inference thread is busy: 1 image's worth queued
    try:
        response = app.test_client().post("/v2/models/tiny/infer", json=fp32_body())
        status, message = v2_error(response)
        assert status == 503 and message.startswith("server busy") and response.headers["Retry-After"] == "1"
    finally:
        release.set()
        assert blocker.result(10) is True


def test_v2_inference_is_counted_in_the_metrics(client):
    def counts() -> tuple[float, float]:
        text = client.get("/metrics").get_data(as_text=True)
        return (metric(text, "serve_requests_total", 0.0, model="tiny", status="200"),
                metric(text, "serve_batch_size_count", 0.0, model="tiny"))

    before = counts()
    assert client.post("/v2/models/tiny/infer", json=fp32_body(), headers={"X-Request-ID": "v2-1"}).status_code == 200
    response = client.post("/v2/models/tiny/infer", json={"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image_bytes()).decode()]}]})
    assert response.status_code == 200
    assert counts() == (before[0] + 2, before[1] + 2)
    assert client.get("/v2/health/live", headers={"X-Request-ID": "v2-2"}).headers["X-Request-ID"] == "v2-2"


def test_v2_errors_are_counted_by_their_code(client):
    """V2 error bodies hold only a message; the metrics still get the code, not http_400."""
    def errors(code: str) -> float:
        return metric(client.get("/metrics").get_data(as_text=True), "serve_errors_total", 0.0, code=code)

    before = errors("invalid_request"), errors("model_not_found"), errors("method_not_allowed")
    assert client.post("/v2/models/tiny/infer", json={"inputs": []}).status_code == 400
    assert client.post("/v2/models/nope/infer", json=fp32_body()).status_code == 404
    assert client.delete("/v2/models/tiny/infer").status_code == 405
    after = errors("invalid_request"), errors("model_not_found"), errors("method_not_allowed")
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_raw_body_limits_are_413(make_app):
    client = make_app(max_upload_bytes=1000).test_client()
    assert v2_error(client.post("/v2/models/tiny/infer", json=fp32_body()))[0] == 413
    bomb = gzip.compress(json.dumps(fp32_body()).encode())
    assert len(bomb) < 1000
    status, message = v2_error(client.post("/v2/models/tiny/infer", data=bomb, headers={"Content-Encoding": "gzip"}))
    assert status == 413 and "decompressed body is over the 1000-byte limit" in message
