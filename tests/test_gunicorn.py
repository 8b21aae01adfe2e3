"""End to end: a real gunicorn on 127.0.0.1 serving the default model and a tiny one."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import expected_probs, image_bytes, tiny_model_config, write_config
from servers import GUNICORN, ROOT, Server, free_port, worker_pids

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = Server({"WEB_CONCURRENCY": "2", "SERVE_DEVICE": "cpu"}, tmp_path_factory.mktemp("gunicorn") / "default.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    import torch
    from conftest import tiny_net

    folder = tmp_path_factory.mktemp("tiny")
    torch.save({"epoch": 3, "model_state_dict": tiny_net().state_dict()}, folder / "tiny.pth")
    config = write_config(folder, [tiny_model_config(Path("tiny.pth"))], max_upload_bytes=100_000)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, folder / "gunicorn.log")
    yield server
    server.stop()


def test_default_model_says_cat(default_server, cat_jpeg):
    response = requests.post(
        f"{default_server.url}/predictions/efficientnet_lite0", data=cat_jpeg,
        headers={"Content-Type": "image/jpeg"}, timeout=30,
    )
    assert response.status_code == 200
    top = response.json()["predictions"][0]
    assert "cat" in top["label"], response.json()
    assert top["probability"] > 0.3


def test_default_model_multipart_upload(default_server, cat_jpeg):
    response = requests.post(
        f"{default_server.url}/predictions/efficientnet_lite0?topk=3", files={"image": ("cat.jpg", cat_jpeg)}, timeout=30
    )
    assert response.status_code == 200
    labels = [p["label"] for p in response.json()["predictions"]]
    assert len(labels) == 3 and all("cat" in label or label == "tabby" for label in labels)


def test_default_server_metadata_and_workers(default_server):
    assert requests.get(f"{default_server.url}/ping", timeout=5).json() == {"status": "Healthy"}
    meta = requests.get(f"{default_server.url}/models/efficientnet_lite0", timeout=5).json()
    assert meta["num_classes"] == 1000 and meta["device"] == "cpu"
    assert len(worker_pids(default_server.proc.pid, expected=2)) == 2


def test_tiny_answers_exactly_over_http(tiny_server):
    response = requests.post(f"{tiny_server.url}/predictions/tiny", data=image_bytes((0, 255, 0)),
                             headers={"Content-Type": "image/png"}, timeout=10)
    probs = [p["probability"] for p in response.json()["predictions"]]
    assert probs == pytest.approx(sorted(expected_probs((0, 255, 0)).tolist(), reverse=True), abs=1e-6)


def test_hostile_requests_get_4xx_and_kill_no_worker(tiny_server):
    before = worker_pids(tiny_server.proc.pid, expected=2)
    url = f"{tiny_server.url}/predictions/tiny"
    cases = [
        (dict(data=b"junk", headers={"Content-Type": "image/jpeg"}), 400),
        (dict(data=image_bytes(fmt="JPEG", size=(64, 64))[:200], headers={"Content-Type": "image/jpeg"}), 400),
        (dict(data=b"x" * 200_000, headers={"Content-Type": "image/png"}), 413),
        (dict(data=image_bytes(0, size=(10_000, 10_000), mode="1"), headers={"Content-Type": "image/png"}), 413),
        (dict(json={"a": 1}), 415),
        (dict(files={"image": ("e.png", b"")}), 400),
    ]
    for kwargs, status in cases:
        response = requests.post(url, timeout=10, **kwargs)
        assert response.status_code == status, (kwargs.keys(), response.text)
        assert set(response.json()["error"]) == {"code", "message"}
    assert worker_pids(tiny_server.proc.pid) == before
    assert requests.get(f"{tiny_server.url}/ready", timeout=5).status_code == 200


def test_bad_config_stops_the_server_with_a_clear_message(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, [tiny_model_config(tiny_checkpoint, topk=-1)])
    env = {**os.environ, "SERVE_CONFIG": str(config), "PORT": str(free_port())}
    result = subprocess.run(
        GUNICORN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "model 'tiny': field 'topk': Input should be greater than 0" in result.stderr
