"""Lazy models within a memory budget: loaded on first use, shared loads, least-recently-used eviction,
pins, requests in flight, a model over the budget; in process, and on a real gunicorn with 2 workers."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from conftest import image_bytes, metric, write_config
from models.ballast import Ballast
from servers import Server, worker_pids

from serve.service import Call, Inputs

LABELS = ["first", "second", "third"]
MB = 16  # each model's weights; the budget below holds two, not three


def ballast_spec(folder: Path, name: str, favourite: int, megabytes: float = MB, **overrides) -> dict:
    path = folder / f"{name}.pth"
    if not path.exists():
        torch.save(Ballast(megabytes=megabytes, favourite=favourite).state_dict(), path)
    return {"name": name, "architecture": "models.ballast:Ballast",
            "kwargs": {"megabytes": megabytes, "favourite": favourite, **overrides.pop("kwargs", {})},
            "checkpoint": str(path), "device": "cpu", "runtime": "eager", "load": "lazy", "labels": LABELS,
            "topk": 1, "preprocess": {"resize": 8, "crop": 8}, **overrides}


def three(folder: Path, **overrides) -> list[dict]:
    return [ballast_spec(folder, name, i, **overrides.get(name, {})) for i, name in enumerate("abc")]


def error(answer) -> tuple[int, str, str]:
    body = answer.json["error"]
    return answer.status_code, body["code"], body["message"]


def predict(client, name: str, **headers):
    return client.post(f"/predictions/{name}", data=image_bytes(), content_type="image/png", headers=headers)


def label(answer) -> str:
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.json["predictions"][0]["label"]


def loaded(client) -> dict[str, bool]:
    return {m["name"]: m["loaded"] for m in client.get("/models").json["models"]}


BUDGET = f"{int(2.5 * MB)}MiB"


def test_a_lazy_model_loads_on_its_first_request_and_shows_its_state(tmp_path, make_app):
    app = make_app(*three(tmp_path), model_memory_budget=BUDGET)
    client = app.test_client()
    assert client.get("/ready").status_code == 200  # no eager model to wait for
    assert loaded(client) == {"a": False, "b": False, "c": False}
    unloaded = client.get("/models/a").json
    assert unloaded["state"] == "UNAVAILABLE" and unloaded["bytes"] == 0 and unloaded["load"] == "lazy"
    assert client.get("/v2/models/a/ready").status_code == 503
    assert label(predict(client, "b")) == "second"
    described = client.get("/models/b").json
    assert described["loaded"] and described["ready"] and MB * 2**20 <= described["bytes"] < 3 * MB * 2**20
    index = client.post("/v2/repository/index").json
    assert [(row["name"], row["state"]) for row in index] == [("a", "UNAVAILABLE"), ("b", "READY"), ("c", "UNAVAILABLE")]
    assert client.post("/v2/repository/index", json={"ready": True}).json == [
        {"name": "b", "version": "1", "state": "READY"}]
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "serve_lazy_loads_total", model="b") == 1 and metric(text, "serve_models_loaded") == 1


def test_the_least_recently_used_model_is_evicted_and_loads_again(tmp_path, make_app):
    app = make_app(*three(tmp_path), model_memory_budget=BUDGET)
    client = app.test_client()
    assert [label(predict(client, n)) for n in "ab"] == ["first", "second"]
    assert label(predict(client, "a")) == "first"  # a is now the more recently used
    assert label(predict(client, "c")) == "third"  # b goes, not a
    assert loaded(client) == {"a": True, "b": False, "c": True}
    assert label(predict(client, "b")) == "second"  # loads again; a (used before c) goes
    assert loaded(client) == {"a": False, "b": True, "c": True}
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "serve_evictions_total", model="b") == 1 and metric(text, "serve_evictions_total", model="a") == 1
    assert metric(text, "serve_lazy_loads_total", model="b") == 2
    assert metric(text, "serve_model_bytes", model="a") == 0
    assert app.extensions["serve"].table.residency.held() <= 2.5 * MB * 2**20


def test_a_pinned_model_is_never_evicted(tmp_path, make_app):
    app = make_app(*three(tmp_path, a={"pin": True}), model_memory_budget=BUDGET)
    client = app.test_client()
    assert [label(predict(client, n)) for n in "abc"] == ["first", "second", "third"]
    assert loaded(client) == {"a": True, "b": False, "c": True}  # a is the oldest, but pinned
    assert label(predict(client, "b")) == "second"
    assert loaded(client) == {"a": True, "b": True, "c": False}


def test_a_model_with_a_request_in_flight_is_not_evicted(tmp_path, make_app):
    app = make_app(*three(tmp_path), model_memory_budget=BUDGET)
    service, client = app.extensions["serve"], app.test_client()
    assert label(predict(client, "a")) == "first"
    reading, release, answers = threading.Event(), threading.Event(), []

    def read(_served) -> Inputs:  # a's request holds the model while its body arrives
        reading.set()
        release.wait(30)
        return Inputs([image_bytes()])

    slow = threading.Thread(target=lambda: answers.append(service.predict(Call(read, "a"))))
    slow.start()
    try:
        assert reading.wait(10)
        assert [label(predict(client, n)) for n in "bc"] == ["second", "third"]  # a is the oldest: b goes
        assert loaded(client) == {"a": True, "b": False, "c": True}
    finally:
        release.set()
        slow.join(10)
    assert answers[0].results()[0].predictions[0].label == "first"


def test_concurrent_first_requests_share_one_load_and_a_deadline_passing_gets_503(tmp_path, make_app):
    spec = ballast_spec(tmp_path, "slow", 2, kwargs={"load_delay_s": 1.0})
    app = make_app(spec)
    client = app.test_client()
    hurried = predict(client, "slow", **{"X-Request-Timeout-Ms": "100"})  # the load takes 1 s
    status, code, message = error(hurried)
    assert (status, code) == (503, "overloaded") and "is loading" in message and hurried.headers["Retry-After"]
    answers, start = [], threading.Barrier(8)

    def first():
        start.wait(10)
        answers.append(predict(app.test_client(), "slow"))

    threads = [threading.Thread(target=first) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [label(a) for a in answers] == ["third"] * 8
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "serve_lazy_loads_total", model="slow") == 1  # the hurried request's load, shared by all 8


def test_loaded_models_answer_while_a_lazy_model_loads(tmp_path, make_app, tiny_checkpoint):
    from conftest import tiny_model_config

    app = make_app(tiny_model_config(tiny_checkpoint), ballast_spec(tmp_path, "slow", 2, kwargs={"load_delay_s": 2.0}))
    client = app.test_client()
    assert error(predict(client, "slow", **{"X-Request-Timeout-Ms": "50"}))[:2] == (503, "overloaded")
    # Answered while the slow model is still loading: the load runs beside the inference thread, not on it.
    assert predict(client, "tiny").status_code == 200
    assert [row["state"] for row in client.post("/v2/repository/index").json if row["name"] == "slow"] == ["LOADING"]


def test_a_model_larger_than_the_whole_budget_is_refused_clearly(tmp_path, make_app, caplog):
    app = make_app(ballast_spec(tmp_path, "big", 0, megabytes=24), model_memory_budget="16MiB")
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="serve.loader")
    status, code, message = error(predict(client, "big"))
    assert (status, code) == (507, "model_too_large")
    assert "more than the whole model_memory_budget (16777216)" in message
    assert loaded(client) == {"big": False}
    assert error(predict(client, "big"))[:2] == (507, "model_too_large")  # refused again, without loading again
    assert sum("model 'big' loaded" in r.getMessage() for r in caplog.records if r.name == "serve.loader") == 1


def test_management_changes_to_a_lazy_model_load_it_first(tmp_path, make_app):
    app = make_app(*three(tmp_path), model_memory_budget=BUDGET, enable_management=True,
                   state_dir=str(tmp_path), models_dir=str(tmp_path))
    client = app.test_client()
    torch.save(Ballast(megabytes=MB, favourite=1).state_dict(), tmp_path / "a2.pth")
    answer = client.post("/models/a/versions", json={"version": "2", "checkpoint": "a2.pth", "default": True})
    assert answer.status_code == 201, answer.json
    assert label(predict(client, "a")) == "second" and label(client.post(
        "/predictions/a/1", data=image_bytes(), content_type="image/png")) == "first"


def pss_bytes(pid: int) -> int:
    """A process's proportional set size (its own pages, plus its share of pages it shares)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


@pytest.mark.server
def test_on_gunicorn_an_evicted_models_memory_returns(tmp_path):
    """2 workers, a budget of two 64 MB models: each worker loads what its requests need; loading a
    third in a worker evicts its oldest, and the worker's PSS stays near two models' worth."""
    size = 64
    specs = [ballast_spec(tmp_path, n, i, megabytes=size) for i, n in enumerate("abc")]
    config = write_config(tmp_path, specs, model_memory_budget=f"{int(2.5 * size)}MiB")
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "gunicorn.log")
    try:
        pids = worker_pids(server.proc.pid, expected=2)
        session = requests.Session()  # one keep-alive connection: one worker answers all of it

        def ask(name: str) -> str:
            answer = session.post(f"{server.url}/predictions/{name}", data=image_bytes(),
                                  headers={"Content-Type": "image/png"}, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]["label"]

        def total_pss() -> int:
            return sum(pss_bytes(pid) for pid in pids)

        assert ask("a") == "first"
        one = total_pss()
        assert ask("b") == "second"
        two = total_pss()
        assert ask("c") == "third"  # this worker evicts a
        three_loaded = total_pss()
        models = {m["name"]: m["loaded"] for m in session.get(f"{server.url}/models", timeout=10).json()["models"]}
        assert models == {"a": False, "b": True, "c": True}
        text = session.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "serve_evictions_total", model="a") == 1
    finally:
        assert server.stop() == 0
    model = size * 2**20
    assert two - one > 0.8 * model, (one, two)  # a model's worth arrived
    assert three_loaded - two < 0.4 * model, (two, three_loaded)  # and one left when the next came
    log = (tmp_path / "gunicorn.log").read_text()
    assert "model 'a': evicted to fit model 'c'" in log


@pytest.mark.server
def test_on_gunicorn_first_requests_share_each_workers_load_and_too_large_is_refused(tmp_path):
    """2 workers: 8 concurrent first requests for a slow-loading lazy model load it at most once per
    worker; a model over the whole budget answers 507 from either worker, and nothing dies."""
    specs = [ballast_spec(tmp_path, "slow", 1, kwargs={"load_delay_s": 1.0}),
             ballast_spec(tmp_path, "big", 0, megabytes=64)]
    config = write_config(tmp_path, specs, model_memory_budget="32MiB")
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "gunicorn.log")
    try:
        pids = worker_pids(server.proc.pid, expected=2)
        answers, start = [], threading.Barrier(8)

        def first():
            start.wait(10)
            answers.append(requests.post(f"{server.url}/predictions/slow", data=image_bytes(),
                                         headers={"Content-Type": "image/png", "Connection": "close"}, timeout=60))

        threads = [threading.Thread(target=first) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200] * 8
        assert {a.json()["predictions"][0]["label"] for a in answers} == {"second"}
        big = requests.post(f"{server.url}/predictions/big", data=image_bytes(), headers={"Content-Type": "image/png"},
                            timeout=60)
        assert big.status_code == 507 and big.json()["error"]["code"] == "model_too_large"
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 1 <= metric(text, "serve_lazy_loads_total", model="slow") <= 2  # one load per worker at most
        assert worker_pids(server.proc.pid, expected=2) == pids  # no worker died
    finally:
        assert server.stop() == 0
