"""Metrics, request ids and the JSON access log: in-process, and summed over real gunicorn workers."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import requests

from conftest import image_bytes, metric, tiny_model_config, write_config
from servers import Server


def test_metrics_add_up_after_traffic(client):
    for _ in range(3):
        assert client.post("/predictions/tiny", data=image_bytes(), content_type="image/png").status_code == 200
    files = {"a": (io.BytesIO(image_bytes()), "a.png"), "b": (io.BytesIO(image_bytes()), "b.png")}
    assert client.post("/predictions/tiny", data=files, content_type="multipart/form-data").status_code == 200
    assert client.post("/predictions/tiny", data=b"junk", content_type="image/png").status_code == 400
    assert client.post("/predictions/nope", data=image_bytes(), content_type="image/png").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert metric(text, "serve_requests_total", model="tiny", status="200") == 4
    assert metric(text, "serve_requests_total", model="tiny", status="400") == 1
    assert metric(text, "serve_requests_total", model="(unknown)", status="404") == 1  # not one label per made-up name
    assert 'model="nope"' not in text
    assert metric(text, "serve_errors_total", code="invalid_image") == 1
    assert metric(text, "serve_errors_total", code="model_not_found") == 1
    assert metric(text, "serve_request_duration_seconds_count", model="tiny", status="200") == 4
    # Five images went through the model (3 single, 2 in one request), plus no warm-up in the metrics.
    assert metric(text, "serve_batch_size_sum", model="tiny") == 5
    assert metric(text, "serve_inference_duration_seconds_count", model="tiny") == metric(
        text, "serve_batch_size_count", model="tiny")
    assert metric(text, "serve_model_load_seconds", model="tiny") > 0
    assert metric(text, "serve_queue_depth") == 0


def test_request_id_is_echoed_or_made_and_logged_as_json(client, caplog):
    with caplog.at_level(logging.INFO, logger="serve.access"):
        given = client.post("/predictions/tiny", data=image_bytes(), content_type="image/png",
                            headers={"X-Request-ID": "req-42"})
        made = client.get("/ping", headers={"X-Request-ID": "bad id with spaces"})
    assert given.headers["X-Request-ID"] == "req-42"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access"]
    prediction = next(line for line in lines if line["request_id"] == "req-42")
    assert prediction["model"] == "tiny" and prediction["status"] == 200 and prediction["batch_size"] == 1
    assert prediction["method"] == "POST" and prediction["path"] == "/predictions/tiny" and prediction["latency_ms"] >= 0
    assert any(line["request_id"] == made.headers["X-Request-ID"] and line["path"] == "/ping" for line in lines)


@pytest.mark.server
def test_metrics_sum_over_gunicorn_workers_and_logs_are_json(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, [tiny_model_config(tiny_checkpoint)])
    log = tmp_path / "gunicorn.log"
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2", "SERVE_LOG_FORMAT": "json"}, log)
    try:
        session = requests.Session()
        for i in range(20):
            # A fresh connection each time, so both workers take requests.
            response = requests.post(f"{server.url}/predictions/tiny", data=image_bytes(),
                                     headers={"Content-Type": "image/png", "Connection": "close"}, timeout=10)
            assert response.status_code == 200
        assert session.post(f"{server.url}/predictions/tiny", data=b"x", headers={"Content-Type": "image/png"},
                            timeout=10).status_code == 400
        text = requests.get(f"{server.url}/metrics", timeout=10).text
    finally:
        assert server.stop() == 0
    assert metric(text, "serve_requests_total", model="tiny", status="200") == 20
    assert metric(text, "serve_batch_size_sum", model="tiny") == 20
    assert metric(text, "serve_errors_total", code="invalid_image") == 1
    entries = [json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith("{")]
    access = [e for e in entries if "request_id" in e]
    server_logs = [e for e in entries if "logger" in e]
    assert sum(1 for e in access if e["path"] == "/predictions/tiny") == 21
    assert len({e.get("pid") for e in server_logs}) >= 2  # master and workers log JSON too
    assert all(line.startswith("{") for line in Path(log).read_text().splitlines() if line.strip())

