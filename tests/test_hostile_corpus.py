"""The hostile request corpus (tools/hostile_corpus.py) against one real gunicorn with the default config,
and against a second one serving a torchvision detector and segmenter.

Every case must get exactly its expected status (errors: the JSON error shape with the expected
code; 200s: the task's answer), no case may get a 500 or kill a worker, and the server must still be
ready afterwards. The EXIF case must be read upright: the same top-1 label as the upright photo.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from servers import ROOT, Server, worker_pids

pytestmark = pytest.mark.server

MODEL = "efficientnet_lite0"
WORKERS = 2
REQUEST_TIMEOUT_S = 30


def _import_corpus():
    spec = importlib.util.spec_from_file_location("hostile_corpus", ROOT / "tools" / "hostile_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


hostile_corpus = _import_corpus()


@dataclass
class Outcome:
    status: int | None
    body: Any
    seconds: float
    error: str | None = None  # the client-side exception, when no answer came back

    def describe(self) -> str:
        if self.error:
            return f"no answer after {self.seconds:.1f}s: {self.error}"
        return f"{self.status} {str(self.body)[:300]} ({self.seconds:.2f}s)"


@pytest.fixture(scope="module")
def corpus() -> dict[str, Any]:
    return {case.name: case for case in hostile_corpus.build_corpus()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The default config: no SERVE_* overrides from the caller's environment, CPU, two workers.
    server = Server({"WEB_CONCURRENCY": str(WORKERS), "SERVE_DEVICE": "cpu"},
                    tmp_path_factory.mktemp("hostile") / "gunicorn.log", inherit_settings=False)
    server.workers_before = worker_pids(server.proc.pid, expected=WORKERS)
    server.outcomes = {}
    yield server
    server.stop()


def send(server, case, model: str = MODEL) -> Outcome:
    """POST one case (once per server and model; later calls reuse the answer)."""
    if (model, case.name) in server.outcomes:
        return server.outcomes[(model, case.name)]
    timeout = min(REQUEST_TIMEOUT_S, case.max_seconds or REQUEST_TIMEOUT_S)
    started = time.monotonic()
    try:
        response = requests.post(case.url(server.url, model), timeout=timeout, **case.request_kwargs())
    except requests.RequestException as exc:
        outcome = Outcome(None, None, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    else:
        try:
            body = response.json()
        except ValueError:
            body = response.text[:500]
        outcome = Outcome(response.status_code, body, time.monotonic() - started)
    server.outcomes[(model, case.name)] = outcome
    return outcome


def top1(outcome: Outcome) -> str:
    return outcome.body["predictions"][0]["label"]


def check_predictions(answer: Any) -> None:
    assert isinstance(answer, dict) and answer.get("model") == MODEL, answer
    predictions = answer.get("predictions")
    assert isinstance(predictions, list) and predictions, answer
    for p in predictions:
        assert set(p) == {"label", "index", "probability"} and 0.0 <= p["probability"] <= 1.0, p


@pytest.mark.parametrize("name", hostile_corpus.case_names())
def test_case(server, corpus, name):
    case = corpus[name]
    outcome = send(server, case)
    if check_status(name, case, outcome):
        check_classification(server, corpus, name, case, outcome)


def check_status(name: str, case, outcome: Outcome) -> bool:
    """The case's status (and error shape); True for a 200 whose body is left to check."""
    expected = f"{case.status} {case.code or ''}".strip()
    assert outcome.error is None, f"{name}: expected {expected}, {outcome.describe()}"
    assert outcome.status != 500, f"{name}: server error: {outcome.describe()}"
    assert outcome.status == case.status, f"{name}: expected {expected}, got {outcome.describe()}"
    if case.status != 200:
        error = outcome.body.get("error") if isinstance(outcome.body, dict) else None
        assert isinstance(error, dict) and set(error) == {"code", "message"}, f"{name}: not the error shape: {outcome.describe()}"
        assert error["code"] == case.code, f"{name}: expected code {case.code}, got {outcome.describe()}"
        assert isinstance(error["message"], str) and error["message"], outcome.describe()
        return False
    if case.max_seconds is not None:
        assert outcome.seconds <= case.max_seconds, f"{name}: took {outcome.seconds:.1f}s (limit {case.max_seconds}s)"
    return True


def check_classification(server, corpus, name: str, case, outcome: Outcome) -> None:
    if case.results is not None:
        assert isinstance(outcome.body, list) and len(outcome.body) == case.results, outcome.describe()
        for answer in outcome.body:
            check_predictions(answer)
    else:
        check_predictions(outcome.body)
    if case.same_top1_as:
        reference = send(server, corpus[case.same_top1_as])
        assert reference.status == 200, reference.describe()
        assert top1(outcome) == top1(reference), (
            f"{name}: top-1 {top1(outcome)!r}, but the upright {case.same_top1_as} is {top1(reference)!r}"
        )
    if case.different_top1_from:
        reference = send(server, corpus[case.different_top1_from])
        assert reference.status == 200, reference.describe()
        assert top1(outcome) != top1(reference), (
            f"{name}: orientation should change the answer, but both say {top1(outcome)!r}"
        )


def test_corpus_left_every_worker_alive_and_the_server_ready(server):
    """Runs after every case (pytest keeps file order): no 500s, the same worker PIDs, /ready answers 200."""
    check_alive(server)


# --- a detector and a segmenter: the same corpus, the answers of their tasks ----------------------

TASK_MODELS = {"detector": "detections", "segmenter": "mask"}  # model -> the key every answer of its task has
# Cases about classify's query parameter: the other tasks don't read ?topk, so those images are 200s.
CLASSIFY_ONLY = {n for n, c in ((c.name, c) for c in hostile_corpus.build_corpus())
                 if "topk" in c.query or c.same_top1_as or c.different_top1_from}


@pytest.fixture(scope="module")
def task_server(tmp_path_factory):
    import torch
    import torchvision
    from conftest import write_config

    folder = tmp_path_factory.mktemp("hostile-tasks")
    models = []
    for name, task, arch, kwargs in (("detector", "detect", "fasterrcnn_mobilenet_v3_large_320_fpn", {}),
                                     ("segmenter", "segment", "lraspp_mobilenet_v3_large", {"num_classes": 21})):
        torch.manual_seed(0)
        net = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs)
        torch.save(net.state_dict(), folder / f"{name}.pth")
        models.append({"name": name, "task": task, "runtime": "eager", "architecture": arch, "kwargs": {"weights_backbone": None, **kwargs},
                       "checkpoint": str(folder / f"{name}.pth"), "device": "cpu"})
    config = write_config(folder, models)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": str(WORKERS)}, folder / "gunicorn.log",
                    inherit_settings=False)
    server.workers_before = worker_pids(server.proc.pid, expected=WORKERS)
    server.outcomes = {}
    yield server
    server.stop()


@pytest.mark.parametrize("model", list(TASK_MODELS))
@pytest.mark.parametrize("name", [n for n in hostile_corpus.case_names() if n not in CLASSIFY_ONLY])
def test_case_on_a_detector_and_a_segmenter(task_server, corpus, model, name):
    case = corpus[name]
    outcome = send(task_server, case, model)
    if check_status(name, case, outcome):
        answers = outcome.body if case.results is not None else [outcome.body]
        assert isinstance(answers, list) and len(answers) == (case.results or 1), outcome.describe()
        for answer in answers:
            assert answer.get("model") == model and TASK_MODELS[model] in answer, outcome.describe()


def test_task_corpus_left_every_worker_alive_and_the_server_ready(task_server):
    check_alive(task_server)


def check_alive(server) -> None:
    server_errors = {n: o.describe() for n, o in server.outcomes.items() if o.status is not None and o.status >= 500}
    assert not server_errors, server_errors
    assert worker_pids(server.proc.pid) == server.workers_before, "a worker died or was replaced during the corpus"
    ready = requests.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert requests.get(f"{server.url}/ping", timeout=10).json() == {"status": "Healthy"}
