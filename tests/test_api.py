"""The HTTP API through the real Flask app: answers, exact probabilities, and every error in one JSON shape."""
from __future__ import annotations

import io
import time

import pytest
import torch
from conftest import LABELS, expected_probs, image_bytes, tiny_model_config
from flask import Flask

from serve.app import create_app
from serve.errors import ConfigError, register_error_handlers


def expected_answer(rgb, k=3, model="tiny"):
    probs = expected_probs(rgb)
    top = probs.topk(k)
    return {
        "model": model,
        "predictions": [
            {"label": LABELS[i], "index": i, "probability": pytest.approx(p, abs=1e-6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ],
    }


def post_files(client, files, path="/predictions/tiny"):
    data = {f"image{i}": (io.BytesIO(b), f"x{i}.png") for i, b in enumerate(files)}
    return client.post(path, data=data, content_type="multipart/form-data")


def test_ping(client):
    response = client.get("/ping")
    assert response.status_code == 200 and response.json == {"status": "Healthy"}


def test_ready(client):
    response = client.get("/ready")
    assert response.status_code == 200 and response.json == {"status": "ready", "models": ["tiny"]}


def test_model_metadata(client, tiny_checkpoint):
    meta = client.get("/models/tiny").json
    assert meta["name"] == "tiny" and meta["architecture"] == "models.tiny:TinyNet"
    assert meta["device"] == "cpu" and meta["ready"] is True
    assert meta["input"]["shape"] == [3, 8, 8]
    assert (meta["num_classes"], meta["num_labels"], meta["topk"]) == (3, 3, 3)
    assert meta["checkpoint"]["file"] == "tiny.pth"
    assert len(meta["checkpoint"]["sha256"]) == 64 and meta["checkpoint"]["layout"] == "bare state_dict"
    assert meta["load_time_s"] >= 0
    assert client.get("/models").json == {"models": [meta]}


@pytest.mark.parametrize("rgb", [(255, 0, 0), (0, 255, 0), (10, 20, 250)])
def test_raw_body_prediction_is_exact(client, rgb):
    response = client.post("/predictions/tiny", data=image_bytes(rgb), content_type="image/png")
    assert response.status_code == 200
    assert response.json == expected_answer(rgb)


@pytest.mark.parametrize("content_type", ["application/octet-stream", "image/jpeg", "application/x-www-form-urlencoded"])
def test_raw_body_content_types(client, content_type):
    response = client.post("/predictions/tiny", data=image_bytes(fmt="BMP"), content_type=content_type)
    assert response.status_code == 200 and response.json["predictions"][0]["label"] == "red"


def test_put_and_default_model_paths(client):
    assert client.put("/predictions/tiny", data=image_bytes(), content_type="image/png").json == expected_answer((255, 0, 0))
    assert client.post("/predictions", data=image_bytes(), content_type="image/png").json == expected_answer((255, 0, 0))


def test_topk(client):
    response = client.post("/predictions/tiny?topk=1", data=image_bytes((0, 0, 255)), content_type="image/png")
    assert response.json == expected_answer((0, 0, 255), k=1)


def test_multipart_one_file_answers_one_object(client):
    response = post_files(client, [image_bytes((0, 255, 0))])
    assert response.status_code == 200 and response.json == expected_answer((0, 255, 0))


def test_multipart_several_files_answer_in_order(client):
    colours = [(0, 0, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    response = post_files(client, [image_bytes(c) for c in colours])
    assert response.status_code == 200
    assert response.json == [expected_answer(c) for c in colours]


def error(response):
    assert response.is_json, response.data[:200]
    body = response.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return response.status_code, body["error"]["code"], body["error"]["message"]


@pytest.mark.parametrize(
    "kwargs, status, code, needle",
    [
        ({"data": b"definitely not an image", "content_type": "image/jpeg"}, 400, "invalid_image", "not an image"),
        ({"data": image_bytes(fmt="JPEG")[:100], "content_type": "image/jpeg"}, 400, "invalid_image", "truncated or corrupt"),
        ({"data": b"", "content_type": "image/png"}, 400, "invalid_request", "body is empty"),
        ({"json": {"image": "aGVsbG8="}}, 415, "unsupported_media_type", "Content-Type 'application/json'"),
        ({"data": b"hello", "content_type": "text/plain"}, 415, "unsupported_media_type", "text/plain"),
        ({"data": {"field": "value"}, "content_type": "multipart/form-data"}, 400, "invalid_request", "holds no file"),
        ({"data": {"image": (io.BytesIO(b""), "empty.png")}, "content_type": "multipart/form-data"}, 400, "invalid_image", "empty (0 bytes)"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client, kwargs, status, code, needle):
    got_status, got_code, message = error(client.post("/predictions/tiny", **kwargs))
    assert (got_status, got_code) == (status, code)
    assert needle in message


@pytest.mark.parametrize("topk", ["0", "4", "-1", "two"])
def test_bad_topk_is_400(client, topk):
    status, code, message = error(client.post(f"/predictions/tiny?topk={topk}", data=image_bytes(), content_type="image/png"))
    assert (status, code) == (400, "invalid_request") and "topk" in message


def test_one_bad_file_names_its_position(client):
    response = post_files(client, [image_bytes(), b"garbage", image_bytes()])
    status, code, message = error(response)
    assert (status, code) == (400, "invalid_image") and message.startswith("image 2 of 3:")


def test_unknown_model_route_and_method(client):
    assert error(client.post("/predictions/nope", data=image_bytes(), content_type="image/png"))[:2] == (404, "model_not_found")
    assert error(client.get("/models/nope"))[:2] == (404, "model_not_found")
    assert error(client.get("/no/such/route"))[:2] == (404, "not_found")
    response = client.get("/predictions/tiny")
    assert error(response)[:2] == (405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]




def test_body_too_large_is_413(make_app):
    client = make_app(max_upload_bytes=1000).test_client()
    big = image_bytes(size=(300, 300), fmt="BMP")
    assert error(client.post("/predictions/tiny", data=big, content_type="image/bmp"))[:2] == (413, "request_entity_too_large")
    multipart = post_files(client, [big])
    assert error(multipart)[:2] == (413, "request_entity_too_large")


def test_too_many_pixels_is_413(make_app):
    client = make_app(max_image_pixels=100).test_client()
    status, code, message = error(client.post("/predictions/tiny", data=image_bytes(size=(20, 20)), content_type="image/png"))
    assert (status, code) == (413, "image_too_large") and "20x20 = 400 pixels" in message


def test_too_many_images_is_413(make_app):
    client = make_app(max_images_per_request=2).test_client()
    status, code, message = error(post_files(client, [image_bytes()] * 3, path="/predictions/tiny"))
    assert (status, code) == (413, "too_many_images") and "3 images" in message


def test_bad_input_leaves_the_model_serving(client):
    for data in (b"", b"junk", image_bytes(fmt="JPEG")[:50]):
        client.post("/predictions/tiny", data=data, content_type="image/jpeg")
    assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png").json == expected_answer((255, 0, 0))


def test_unexpected_errors_are_500_without_internals():
    app = Flask(__name__)
    register_error_handlers(app)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret path /etc/shadow")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.json == {"error": {"code": "internal_error", "message": "internal server error"}}


def test_startup_refuses_a_bad_model(tiny_checkpoint):
    with pytest.raises(ConfigError, match="model 'tiny': field 'labels': 2 labels, but the model outputs 3 classes"):
        create_app({"models": [tiny_model_config(tiny_checkpoint, labels=["a", "b"])]})


def test_several_models_served_side_by_side(tmp_path, tiny_checkpoint, make_app):
    from models.seed_fcn import MyModel

    seed = tmp_path / "seed.pth"
    torch.save({"epoch": 1, "model_state_dict": MyModel().state_dict()}, seed)
    client = make_app(
        tiny_model_config(tiny_checkpoint),
        {"name": "seed", "architecture": "models.seed_fcn:MyModel", "checkpoint": str(seed), "device": "cpu",
         "preprocess": {"resize": 72, "crop": 64}, "classify": {"spatial_average": True}},
    ).test_client()
    answer = client.post("/predictions/seed?topk=2", data=image_bytes(size=(100, 80)), content_type="image/png").json
    assert answer["model"] == "seed" and len(answer["predictions"]) == 2
    assert client.get("/models/seed").json["num_classes"] == 32
    assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png").json == expected_answer((255, 0, 0))


def test_full_queue_is_shed_at_once_with_retry_after(make_app):
    import threading

    app = make_app(max_queue=2)
    batcher = app.extensions["serve"].scheduler.batcher
    release = threading.Event()
    blocker = batcher.call(release.wait, 10)  # occupies the inference thread: 1 pending
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(
        app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png")))
    waiting.start()
    deadline = time.monotonic() + 10
    while batcher.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.pending == 2, "the second request never queued"
    response = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png")
    assert error(response)[:2] == (503, "overloaded")
    assert response.headers["Retry-After"] == "1"
    release.set()
    waiting.join(10)
    assert blocker.result(5) is True
    assert answers[0].status_code == 200 and answers[0].json == expected_answer((255, 0, 0))
    assert batcher.pending == 0


def test_request_deadline_answers_503(make_app):
    import threading

    app = make_app(request_timeout_s=0.05)
    release = threading.Event()
    app.extensions["serve"].scheduler.batcher.call(release.wait, 10)
    response = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png")
    release.set()
    status, code, message = error(response)
    assert (status, code) == (503, "timeout") and "did not answer within 0.05s" in message


def test_request_deadline_covers_all_its_images(tiny_checkpoint, make_app):
    """One deadline per request: two images in batches of one, 200 ms each, miss a 300 ms deadline
    although each image alone would make it."""
    slow = tiny_model_config(tiny_checkpoint, architecture="models.tiny:SlowNet", kwargs={"delay_ms": 200}, runtime="eager",
                             max_batch_size=1)
    app = make_app(slow, request_timeout_s=0.3)
    files = {"a": (io.BytesIO(image_bytes()), "a.png"), "b": (io.BytesIO(image_bytes()), "b.png")}
    response = app.test_client().post("/predictions/tiny", data=files, content_type="multipart/form-data")
    assert error(response)[:2] == (503, "timeout")


def test_reload_is_off_by_default(client):
    assert error(client.post("/models/tiny/reload"))[:2] == (404, "not_found")


def test_reload_swaps_weights_only_when_the_new_file_works(tiny_checkpoint, make_app):
    app = make_app(enable_management=True)
    client = app.test_client()
    red = image_bytes((255, 0, 0))
    old_sha = client.get("/models/tiny").json["checkpoint"]["sha256"]

    flipped = tiny_net_with_weight(torch.eye(3).flip(0) * 2)  # red now scores as "blue"
    torch.save(flipped.state_dict(), tiny_checkpoint)
    response = client.post("/models/tiny/reload")
    assert response.status_code == 200 and response.json["checkpoint"]["sha256"] != old_sha
    assert client.post("/predictions/tiny", data=red, content_type="image/png").json["predictions"][0]["label"] == "blue"

    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[: len(data) // 2])  # a copy interrupted half-way
    status, code, message = error(client.post("/models/tiny/reload"))
    assert (status, code) == (409, "reload_failed")
    assert message.startswith("reload failed, still serving the previous weights: model 'tiny': checkpoint")
    assert "corrupt or truncated" in message
    assert client.post("/predictions/tiny", data=red, content_type="image/png").json["predictions"][0]["label"] == "blue"
    assert client.get("/ready").status_code == 200


def test_reload_refuses_a_file_that_fails_its_sha256(tiny_checkpoint, make_app):
    from serve.sources.cache import file_sha256

    spec = tiny_model_config(tiny_checkpoint, sha256=file_sha256(tiny_checkpoint))
    client = make_app(spec, enable_management=True).test_client()
    torch.save(tiny_net_with_weight(torch.zeros(3, 3)).state_dict(), tiny_checkpoint)
    status, code, message = error(client.post("/models/tiny/reload"))
    assert (status, code) == (409, "reload_failed") and "config expects" in message
    assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png").json == expected_answer((255, 0, 0))


def tiny_net_with_weight(weight):
    from conftest import tiny_net

    net = tiny_net()
    with torch.no_grad():
        net.fc.weight.copy_(weight)
    return net
