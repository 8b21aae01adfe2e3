"""Admission bounded in time, in-process: the measured per-image cost, shedding by predicted wait with
Retry-After, the client's deadline (header and V2 timeout), the count cap, shed metrics.

The inference thread is held by a call the test releases, so what is queued is known exactly; the
slow model's forward takes a known time (models/tiny.py SlowNet), so its cost is known too."""
from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import image_bytes, metric, tiny_model_config, tiny_net

from serve.admission import EWMA_WEIGHT, ServiceTime, header_timeout_s, retry_after_s, v2_timeout_s
from serve.errors import InvalidRequestError

PNG = image_bytes((0, 255, 0))
DELAY_MS = 100


def slow_spec(folder: Path, **overrides) -> dict:
    torch.save(tiny_net().state_dict(), folder / "slow.pth")
    return tiny_model_config(folder / "slow.pth", name="slow", architecture="models.tiny:SlowNet",
                             kwargs={"num_classes": 3, "delay_ms": DELAY_MS}, max_batch_size=1, **overrides)


class Held:
    """The app's inference thread held by a call until released; images queued behind it wait."""

    def __init__(self, app):
        self.service = app.extensions["serve"]
        self.release = threading.Event()
        self.service.scheduler.batcher.call(self.release.wait, 30)

    def queue(self, count: int) -> list:
        """`count` images queued for the slow model's default version, as requests queue them."""
        served = self.service.table.served("slow")
        tensor = served.predictor.preprocess(PNG).tensor
        scheduler = self.service.scheduler
        futures = scheduler.batcher.submit_many(served.lanes.images, [tensor] * count)
        scheduler.service_time.track("slow", futures)
        return futures

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()


def drained(app) -> None:
    """Wait (10 s at most) until the held images have run."""
    scheduler = app.extensions["serve"].scheduler
    deadline = time.monotonic() + 10
    while scheduler.batcher.pending and time.monotonic() < deadline:
        time.sleep(0.01)


def error(answer):
    body = answer.json
    return answer.status_code, body["error"]["code"], body["error"]["message"]


def test_service_time_is_an_ewma_of_batch_time_per_image():
    service = ServiceTime()
    service.seed("m", 0.010)
    service.seed("m", 99)  # only a first estimate: the seed doesn't replace what is known
    assert service.cost_s("m") == 0.010
    service.observe("m", 4, 0.080)  # 20 ms an image in a batch of 4
    assert service.cost_s("m") == pytest.approx(EWMA_WEIGHT * 0.020 + (1 - EWMA_WEIGHT) * 0.010)
    for _ in range(60):
        service.observe("m", 2, 0.060)
    assert service.cost_s("m") == pytest.approx(0.030, rel=1e-3)


def test_predicted_wait_counts_queued_images_per_model_until_answered_or_cancelled():
    from concurrent.futures import Future

    service = ServiceTime()
    service.seed("a", 0.1)
    service.seed("b", 0.5)
    futures = [Future() for _ in range(3)]
    service.track("a", futures[:2])
    service.track("b", futures[2:])
    assert service.predicted_wait_s() == pytest.approx(2 * 0.1 + 0.5)
    futures[0].set_result(1)
    futures[2].cancel()
    assert service.predicted_wait_s() == pytest.approx(0.1)


@pytest.mark.parametrize("wait,expected", [(0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (7.5, 8)])
def test_retry_after_is_the_predicted_wait_in_whole_seconds_at_least_1(wait, expected):
    assert retry_after_s(wait) == expected


def test_client_deadlines_parse_and_bad_ones_are_400():
    assert header_timeout_s({}) is None
    assert header_timeout_s({"X-Request-Timeout-Ms": "250"}) == 0.25
    assert v2_timeout_s({"timeout": 1_500_000}) == 1.5  # microseconds, as tritonclient sends it
    for bad in ("0", "-5", "soon", "nan", "inf"):
        with pytest.raises(InvalidRequestError, match="X-Request-Timeout-Ms must be a positive number"):
            header_timeout_s({"X-Request-Timeout-Ms": bad})
    for bad in (0, -1, 1.5, "100", True):
        with pytest.raises(InvalidRequestError, match="'timeout' must be a positive integer"):
            v2_timeout_s({"timeout": bad})


def test_the_measured_cost_follows_the_forward_time(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path))
    scheduler = app.extensions["serve"].scheduler
    assert scheduler.service_time.cost_s("slow") >= DELAY_MS / 1000  # seeded by a timed forward after warm-up
    client = app.test_client()
    for _ in range(3):
        assert client.post("/predictions/slow", data=PNG, content_type="image/png").status_code == 200
    assert DELAY_MS / 1000 <= scheduler.service_time.cost_s("slow") < 10 * DELAY_MS / 1000


def test_a_request_that_would_wait_over_the_budget_is_shed_at_once_with_retry_after(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path), max_queue_wait_ms=250)
    client = app.test_client()
    with Held(app) as held:
        held.queue(12)  # about 1.2 s of work ahead
        wait = app.extensions["serve"].scheduler.service_time.predicted_wait_s()
        started = time.monotonic()
        answer = client.post("/predictions/slow", data=PNG, content_type="image/png")
        elapsed = time.monotonic() - started
        status, code, message = error(answer)
    assert (status, code) == (503, "overloaded") and elapsed < 1.0  # not after queueing
    assert answer.headers["Retry-After"] == str(math.ceil(wait)) and int(answer.headers["Retry-After"]) >= 2
    assert re.fullmatch(r"server busy: model 'slow' would wait about \d+ ms, over max_queue_wait_ms \(250\); retry later",
                        message)
    text = client.get("/metrics").data.decode()
    assert metric(text, "serve_shed_total", model="slow", reason="predicted_wait") == 1


def test_a_client_that_resends_a_refused_request_at_once_is_held_longer_each_time(tmp_path, make_app):
    """shed_hold_ms: refusals on one connection that come back before their Retry-After are held
    shed_hold_ms x the refusals in a row; a first refusal, another connection, and a refusal for the
    client's own deadline are answered at once."""
    app = make_app(slow_spec(tmp_path), max_queue_wait_ms=250, shed_hold_ms=150)
    client = app.test_client()

    def refused(port: int, headers: dict | None = None) -> float:
        started = time.monotonic()
        answer = client.post("/predictions/slow", data=PNG, content_type="image/png", headers=headers or {},
                             environ_base={"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(port)})
        assert error(answer)[:2] == (503, "overloaded")
        return time.monotonic() - started

    with Held(app) as held:
        held.queue(12)  # about 1.2 s of work ahead: every request here is refused
        first, second, third = refused(5001), refused(5001), refused(5001)
        other = refused(5002)
        deadline = refused(5001, {"X-Request-Timeout-Ms": "200"})
    assert first < 0.15 and other < 0.15 and deadline < 0.15
    assert 0.15 <= second < 0.3 + 0.15 and 0.3 <= third < 1.0


def test_a_request_within_the_budget_is_admitted_and_answered(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path), max_queue_wait_ms=250)
    answers = []
    with Held(app) as held:
        held.queue(1)
        thread = threading.Thread(target=lambda: answers.append(
            app.test_client().post("/predictions/slow", data=PNG, content_type="image/png")))
        thread.start()
        scheduler = app.extensions["serve"].scheduler
        deadline = time.monotonic() + 10
        while scheduler.service_time.predicted_wait_s() < 0.2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the request's image is queued behind the first
    thread.join(10)
    assert answers[0].status_code == 200 and answers[0].json["predictions"][0]["label"] == "green"


def test_the_header_deadline_tightens_the_budget(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path), max_queue_wait_ms=5000)
    client = app.test_client()
    with Held(app) as held:
        held.queue(5)  # about 500 ms ahead: within the server's 5 s, not within the client's 200 ms
        answer = client.post("/predictions/slow", data=PNG, content_type="image/png",
                             headers={"X-Request-Timeout-Ms": "200"})
    status, code, message = error(answer)
    assert (status, code) == (503, "overloaded") and "over 200 ms (X-Request-Timeout-Ms)" in message
    assert answer.headers["Retry-After"] == "1"


def test_a_deadline_that_passes_while_queued_answers_timeout_and_cancels_the_images(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path))
    scheduler = app.extensions["serve"].scheduler
    client = app.test_client()
    with Held(app):
        # Nothing queued: admitted; the held thread never reaches it within 300 ms.
        answer = client.post("/predictions/slow", data=PNG, content_type="image/png",
                             headers={"X-Request-Timeout-Ms": "300"})
        status, code, message = error(answer)
        assert (status, code) == (503, "timeout")
        assert message == "model 'slow' did not answer within 300 ms (X-Request-Timeout-Ms); try again"
        assert scheduler.service_time.predicted_wait_s() == 0 and scheduler.batcher.pending == 1  # only the held call
    text = client.get("/metrics").data.decode()
    assert metric(text, "serve_shed_total", model="slow", reason="deadline") == 1
    assert metric(text, "serve_batch_size_count", model="slow", default=0) == 0  # the image never ran


def test_v2_timeout_parameter_is_the_request_deadline(tmp_path, make_app):
    import base64

    app = make_app(slow_spec(tmp_path))
    client = app.test_client()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}],
               "parameters": {"timeout": 300_000}}
    with Held(app) as held:
        answer = client.post("/v2/models/slow/infer", json=request)
        assert answer.status_code == 503
        assert answer.json == {"error": "model 'slow' did not answer within 300000 us (the request's timeout parameter); try again"}
        held.queue(5)
        answer = client.post("/v2/models/slow/infer", json=request)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.json["error"].startswith("server busy: model 'slow' would wait about")
    drained(app)
    answer = client.post("/v2/models/slow/infer", json={**request, "parameters": {"timeout": "soon"}})
    assert answer.status_code == 400 and "'timeout' must be a positive integer" in answer.json["error"]
    answer = client.post("/v2/models/slow/infer", json={**request, "parameters": {"timeout": 10_000_000}})
    assert answer.status_code == 200 and answer.headers["X-Model-Version"].startswith("1 ")


def test_the_image_count_stays_the_memory_cap(tmp_path, make_app):
    app = make_app(slow_spec(tmp_path), max_queue=3, max_queue_wait_ms=100_000)
    client = app.test_client()
    with Held(app) as held:
        held.queue(2)  # + the held call: 3 waiting
        answer = client.post("/predictions/slow", data=PNG, content_type="image/png")
    status, code, message = error(answer)
    assert (status, code) == (503, "overloaded") and message.startswith("server busy: 3 images waiting (limit 3)")
    text = client.get("/metrics").data.decode()
    assert metric(text, "serve_shed_total", model="slow", reason="queue_full") == 1


def test_a_bad_timeout_header_is_400(client):
    answer = client.post("/predictions/tiny", data=PNG, content_type="image/png", headers={"X-Request-Timeout-Ms": "x"})
    assert error(answer)[:2] == (400, "invalid_request")


def test_resends_forgets_a_client_that_waited_its_retry_after(monkeypatch):
    from serve.admission import Resends

    now = [100.0]
    monkeypatch.setattr("serve.admission.time.monotonic", lambda: now[0])
    resends = Resends(0.02)
    peer = ("127.0.0.1", "40000")
    assert resends.hold_s(peer, 1) == 0.0  # first refusal: at once
    assert resends.hold_s(peer, 1) == 0.02 and resends.hold_s(peer, 1) == 0.04  # back at once, twice
    now[0] += 1.05  # waited the Retry-After, counted from the last (held) answer
    assert resends.hold_s(peer, 1) == 0.0
    assert Resends(0.0).hold_s(peer, 1) == 0.0  # shed_hold_ms 0: never held
    assert all(Resends(0.3).hold_s(peer, 1) <= 1.0 for _ in range(10))
