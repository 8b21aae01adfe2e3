"""KServe V1 (serve/v1.py): each instance form a V1 client sends, the same answers as /predictions, bad
bodies with the right status and message, keys and metrics like the other routes; one real gunicorn."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import image_bytes, metric, tiny_model_config, tiny_net, write_config
from servers import Server

from serve.app import create_app
from serve.config import build_config

MAX_IMAGES = 4
RED, BLUE = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v1") / "tiny.pth"
    torch.save(tiny_net().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def app(checkpoint):
    app = create_app(build_config({"models": [tiny_model_config(checkpoint),
                                              {**tiny_model_config(checkpoint), "name": "colours", "task": "embed"}],
                                   "server": {"max_images_per_request": MAX_IMAGES}}))
    yield app
    app.extensions["serve"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def test_models_and_readiness(client):
    assert client.get("/v1/models").json == {"models": ["tiny", "colours"]}
    assert client.get("/v1/models/tiny").json == {"name": "tiny", "ready": True}
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json == {"error": "no model named 'nope'; models: ['tiny', 'colours']"}


@pytest.mark.parametrize("form", [
    lambda data: b64(data),  # KServe's examples
    lambda data: {"b64": b64(data)},  # TensorFlow Serving
    lambda data: {"data": b64(data)},  # TorchServe's KServe envelope
], ids=["base64", "b64", "data"])
def test_each_instance_form_answers_as_predictions_does(client, form):
    answer = client.post("/v1/models/tiny:predict?topk=2", json={"instances": [form(RED), form(BLUE)]})
    assert answer.status_code == 200, answer.json
    expected = [client.post("/predictions/tiny?topk=2", data=data, content_type="image/png").json for data in (RED, BLUE)]
    assert answer.json == {"predictions": expected}
    assert answer.headers["X-Model-Version"].startswith("1 ")


def test_a_version_path_and_the_embed_task(client):
    answer = client.post("/v1/models/colours/versions/1:predict", json={"instances": [b64(RED)]})
    assert answer.status_code == 200
    assert answer.json == {"predictions": [client.post("/predictions/colours", data=RED, content_type="image/png").json]}
    assert client.post("/v1/models/colours/versions/9:predict", json={"instances": [b64(RED)]}).status_code == 404


@pytest.mark.parametrize("wrapped", [False, True])
def test_tensor_instances_answer_the_v2_outputs(client, wrapped):
    tensor = np.full((3, 8, 8), 0.5, np.float32)
    tensor[0] = 1.0
    instance = {"data": tensor.tolist()} if wrapped else tensor.tolist()
    answer = client.post("/v1/models/tiny:predict", json={"instances": [instance, instance]})
    assert answer.status_code == 200, answer.json
    expected = torch.tensor([3.0, 2.0, 2.0]).softmax(-1).tolist()
    assert len(answer.json["predictions"]) == 2
    for prediction in answer.json["predictions"]:
        assert np.allclose(prediction["probabilities"], expected, atol=1e-6)
    embedded = client.post("/v1/models/colours:predict", json={"instances": [tensor.tolist()]}).json
    assert np.allclose(embedded["predictions"][0]["embedding"], [3.0, 2.0, 2.0], atol=1e-6)


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, 'the request body is empty; send {"instances": [...]}'),
    (b"{nope", 400, "the request body is not valid JSON"),
    (b"[1]", 400, 'the request must be a JSON object with "instances"'),
    (b'{"instances": []}', 400, "'instances' must be a non-empty list"),
    (b'{"instances": "x"}', 400, "'instances' must be a non-empty list"),
    (b'{"instances": [1]}', 400, "instance 1: expected a base64 string"),
    (b'{"instances": [{"b64": "x", "data": "y"}]}', 400, 'instance 1: an object must hold "b64" or "data"'),
    (b'{"instances": ["not base64!"]}', 400, "instance 1 is not valid base64"),
    (b'{"instances": [""]}', 400, "instance 1 is empty"),
    (b'{"instances": ["aGVsbG8="]}', 400, "the data is not an image"),
    (b'{"instances": ["aGVsbG8=", [[[1]]]]}', 400, "instances mix images (base64) and tensors"),
    (b'{"instances": [[[[1, 2]]]]}', 400, "each tensor instance must have shape [3, 8, 8]"),
    (b'{"instances": [[[1, 2], [3]]]}', 400, "ragged"),
    (b'{"instances": [["a"]]}', 400, "tensor instances must hold numbers only"),
    (b'{"instances": ["aGVsbG8=", "aGVsbG8=", "aGVsbG8=", "aGVsbG8=", "aGVsbG8="]}', 413,
     "5 instances in one request; the limit is 4"),
])
def test_bad_bodies(client, body, status, message):
    answer = client.post("/v1/models/tiny:predict", data=body, content_type="application/json")
    assert answer.status_code == status, answer.json
    assert message in answer.json["error"]


def test_explain_is_501_in_the_error_shape(client):
    answer = client.post("/v1/models/tiny:explain", json={"instances": [b64(RED)]})
    assert answer.status_code == 501 and answer.json == {"error": "model 'tiny' has no explainer; use :predict"}
    assert client.post("/v1/models/nope:explain", json={}).status_code == 404


def test_predictions_are_counted_and_logged(client, caplog):
    before = client.get("/metrics").get_data(as_text=True)
    with caplog.at_level("INFO", logger="serve.access"):
        assert client.post("/v1/models/tiny:predict", json={"instances": [b64(RED)]}).status_code == 200
    after = client.get("/metrics").get_data(as_text=True)
    count = lambda text: metric(text, "serve_requests_total", 0.0, model="tiny", status="200", protocol="rest")
    assert count(after) == count(before) + 1
    line = next(r.getMessage() for r in caplog.records if "/v1/models/tiny:predict" in r.getMessage())
    assert '"batch_size": 1' in line and '"status": 200' in line


def test_keys_guard_v1_with_the_inference_scope(make_app, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"web": {"key": "web-key-000000000001", "scopes": ["inference"]},
                                    "prom": {"key": "prom-key-00000000001", "scopes": ["metrics"]}}))
    client = make_app(api_keys_file=str(keys)).test_client()
    body = {"instances": [b64(RED)]}
    missing = client.post("/v1/models/tiny:predict", json=body)
    assert missing.status_code == 401 and "WWW-Authenticate" in missing.headers and "error" in missing.json
    assert client.post("/v1/models/tiny:predict", json=body, headers={"X-API-Key": "prom-key-00000000001"}).status_code == 403
    assert client.post("/v1/models/tiny:predict", json=body, headers={"X-API-Key": "web-key-000000000001"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer web-key-000000000001"}).status_code == 200


@pytest.mark.server
def test_under_gunicorn(checkpoint, tmp_path):
    config = write_config(tmp_path, [tiny_model_config(checkpoint)])
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "gunicorn.log",
                    inherit_settings=False)
    try:
        answer = requests.post(f"{server.url}/v1/models/tiny:predict", json={"instances": [{"b64": b64(RED)}]}, timeout=30)
        direct = requests.post(f"{server.url}/predictions/tiny", data=RED, headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"predictions": [direct.json()]}
    finally:
        assert server.stop() == 0
