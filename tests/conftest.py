"""Fixtures: a tiny model with hand-computable outputs, its checkpoint and config, the app and images."""
from __future__ import annotations

import io
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from models.tiny import TinyNet
from serve.app import create_app
from serve.config import build_config

LABELS = ["red", "green", "blue"]


def tiny_net() -> TinyNet:
    """logits = 2 * (channel means) + 1, each class scoring its own channel."""
    net = TinyNet(num_classes=3)
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(3) * 2)
        net.fc.bias.fill_(1.0)
    return net


def tiny_model_config(checkpoint: Path, **overrides) -> dict:
    spec = {
        "name": "tiny",
        "architecture": "models.tiny:TinyNet",
        "kwargs": {"num_classes": 3},
        "checkpoint": str(checkpoint),
        "device": "cpu",
        "labels": LABELS,
        "topk": 3,
        "preprocess": {"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
        # Tests of the request path hook into the eager module; runtime auto has its own tests.
        "runtime": "eager",
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_net().state_dict(), path)
    return path


@pytest.fixture
def tiny_config(tiny_checkpoint):
    return build_config({"models": [tiny_model_config(tiny_checkpoint)]})


@pytest.fixture
def app(tiny_config):
    app = create_app(tiny_config)
    yield app
    app.extensions["serve"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def write_config(folder: Path, models: list[dict], **server) -> Path:
    """A models.yaml in `folder` for a server or the CLI to read; returns its path."""
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models, **({"server": server} if server else {})}))
    return path


@pytest.fixture
def make_app(tiny_checkpoint):
    """create_app for a test's own config: make_app(*models, **server), the tiny model by default;
    every app made is closed (its inference thread stopped) afterwards."""
    made = []

    def make(*models, **server):
        app = create_app(build_config({"models": list(models) or [tiny_model_config(tiny_checkpoint)],
                                       "server": server}))
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["serve"].close()


_ABSENT = object()


def metric(text: str, name: str, default=_ABSENT, **labels) -> float:
    """The value of a sample in Prometheus exposition text: the sum over the samples whose labels include
    `labels` (serve_requests_total{model, status} sums its protocols); a missing sample is an error unless
    a default is given (a counter that no request has touched yet)."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if match is None:
            continue
        sample = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(sample.get(k) == str(v) for k, v in labels.items()):
            total, found = total + float(match.group(2)), True
    if not found:
        if default is _ABSENT:
            raise AssertionError(f"no sample {name}{labels or ''} in the metrics")
        return default
    return total


def image_bytes(color=(255, 0, 0), size=(16, 16), fmt="PNG", mode="RGB", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save_args)
    return buf.getvalue()


def expected_probs(rgb) -> torch.Tensor:
    """What tiny_net answers for a solid colour: softmax(2 * rgb/255 + 1)."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 * 2 + 1).softmax(-1)


@pytest.fixture
def png_bytes() -> bytes:
    return image_bytes((255, 0, 0))


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# --- waiting on conditions -----------------------------------------------------------------------------


@contextmanager
def torch_threads(count: int):
    """torch at `count` threads on this thread inside (the count is per thread), put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def match_detections(found: list[dict], scores, boxes, labels, score_rtol: float = 1e-4, score_atol: float = 1e-5,
                     box_atol: float = 0.01) -> list[int]:
    """Pair each expected detection (in-process: scores, boxes, labels) with a served one of the same
    label, score and box (within the tolerances), each served one used once; return, per expected
    detection, the index of its served match. Order-free: a seeded detector scores many boxes nearly
    alike, and float32 sums on another thread count can swap two whose scores differ in the last bits.

    Raises AssertionError naming the first expected detection with no match.
    """
    assert len(found) == len(scores), f"{len(found)} detections served, {len(scores)} expected"
    used, pairs = set(), []
    for i, (score, box, label) in enumerate(zip(scores.tolist(), boxes.tolist(), labels.tolist())):
        match = next((j for j, d in enumerate(found) if j not in used and d["index"] == label
                      and abs(d["score"] - score) <= score_atol + score_rtol * abs(score)
                      and all(abs(a - b) <= box_atol for a, b in zip(d["box"], box))), None)
        assert match is not None, f"expected detection {i} (label {label}, score {score:.6f}, box {box}) not served"
        used.add(match)
        pairs.append(match)
    return pairs


def wait_until(condition, limit_s: float = 10.0, what: str = "the condition", interval_s: float = 0.01):
    """Poll condition() until it returns something true, and return that; AssertionError after limit_s.

    The suite waits on conditions, never on a sleep that guesses how long something takes "by now":
    on a busy machine a guess is too short, on a quiet one it is time wasted."""
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {limit_s} s")
        time.sleep(interval_s)


MARKED_NET = '''
from models.tiny import SlowNet


class MarkedSlowNet(SlowNet):
    """SlowNet that appends its batch size to a file as each forward starts: a test sees from outside
    that a server's worker has an image inside its forward."""

    def __init__(self, num_classes=3, in_channels=3, delay_ms=100.0, started=""):
        super().__init__(num_classes, in_channels, delay_ms)
        self.started = started

    def forward(self, x):
        with open(self.started, "a") as f:
            f.write(f"{x.shape[0]}\\n")
        return super().forward(x)
'''


class ForwardLog:
    """The file a MarkedSlowNet writes as each forward starts (written to `folder` with its module).

    Use `architecture` and `kwargs(delay_ms)` in the model's entry and `env` in the server's; `images()`
    counts the images that have entered a forward (warm-up included: take a count once the server is
    ready and wait for more)."""

    architecture = "marked_net:MarkedSlowNet"

    def __init__(self, folder: Path):
        (folder / "marked_net.py").write_text(MARKED_NET)
        self.folder = folder
        self.path = folder / "forwards.log"

    def kwargs(self, delay_ms: float) -> dict:
        return {"num_classes": 3, "delay_ms": delay_ms, "started": str(self.path)}

    @property
    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(self.folder), os.environ.get("PYTHONPATH")]))}

    def images(self) -> int:
        try:
            return sum(int(line) for line in self.path.read_text().split())
        except FileNotFoundError:
            return 0

    def wait(self, images: int, limit_s: float = 30) -> None:
        """Until `images` images in all have entered a forward."""
        wait_until(lambda: self.images() >= images, limit_s, f"{images} images inside a forward")


# --- test tiers: what a test starts needs its marker (pytest.ini lists them) ---------------------------
#
# Every subprocess a test (or a fixture it uses) starts is seen here (the interpreter's audit event
# subprocess.Popen): a gunicorn or nginx needs the `server` mark, Docker's tools `container`, Chromium
# `browser`, the soak script `soak`. A test without the mark fails, so `-m "not server"` (make test-fast)
# can't run one by mistake. `slow` is for tests slow for other reasons: timing them is the only check.

_KINDS = {"gunicorn": "server", "nginx": "server", "dockerd": "container", "docker": "container",
          "docker-compose": "container", "debootstrap": "container", "chromedriver": "browser",
          "chromium": "browser", "soak.py": "soak"}
_starts: dict[str, set[str]] = {}  # what each test's setup or call, or each fixture's setup, started
_running: list[str] = []  # the test, then the fixtures being set up (innermost last)


def _kinds_of(args) -> set[str]:
    words = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args or [])
    kinds = set()
    for word in words:
        if isinstance(word, (str, bytes, os.PathLike)):
            name = (os.path.basename(os.fsdecode(word)).split() or [""])[0]  # a shell line: its command
            if name in _KINDS:
                kinds.add(_KINDS[name])
    return kinds


def _audit(event: str, args) -> None:
    if event == "subprocess.Popen" and _running:  # args: executable, args, cwd, env
        kinds = _kinds_of(args[1]) | _kinds_of([args[0]] if args[0] else [])
        if "soak" in kinds:
            kinds.add("server")  # the soak script runs its own gunicorn
        if kinds:
            for key in _running:
                _starts.setdefault(key, set()).update(kinds)


sys.addaudithook(_audit)


def _fixture_key(fixturedef) -> str:
    return f"fixture:{fixturedef.baseid}::{fixturedef.argname}"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _running.append(_fixture_key(fixturedef))
    try:
        return (yield)
    finally:
        _running.pop()


def _check_marks(item) -> None:
    started = set(_starts.get(item.nodeid, set()))
    info = getattr(item, "_fixtureinfo", None)  # pytest's record of the fixtures a test function uses
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs:
            started |= _starts.get(_fixture_key(defs[-1]), set())
    missing = started - {mark.name for mark in item.iter_markers()}
    if missing:
        pytest.fail(f"{item.nodeid} starts what needs the mark(s) {sorted(missing)} (pytest.ini): "
                    f"add them as @pytest.mark.<name> or to the module's pytestmark", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _running[:] = [item.nodeid]
    try:
        result = yield
    finally:
        _running.clear()
    _check_marks(item)  # after a failure, that failure is the report
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _running[:] = [item.nodeid]
    try:
        result = yield
    finally:
        _running.clear()
    _check_marks(item)
    return result


# Ending the test process: once pytest has run every test and printed its report, the process leaves
# with os._exit and pytest's own exit status, skipping the interpreter's teardown. A native library's
# static destructors (seen once in a CI run, after "1060 passed": "terminate called without an active
# exception", SIGABRT, make test failing) must not turn a passing run into a failed one, nor a failing
# one into a crash. Nothing a test asserts runs there; pytest's temporary directories are handled
# before unconfigure.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
