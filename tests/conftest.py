"""Fixtures: a tiny model with hand-computable outputs, its checkpoint and config, the app and images."""
from __future__ import annotations

import io
import re
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


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a real gunicorn (tests/servers.py)")
