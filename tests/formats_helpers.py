"""Shared by the checkpoint-format tests: photos, the served answer, and timm's own answer to compare it with."""
from __future__ import annotations

import io

import torch
from PIL import Image

from serve.app import create_app
from serve.config import build_config

LABELS = [f"class_{i}" for i in range(10)]


def photo(size: tuple[int, int], fmt: str) -> bytes:
    """skimage's cat, resized to a non-square `size`, as PNG or JPEG bytes."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize(size, Image.Resampling.BICUBIC).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def served(entry: dict, photos: list[bytes]) -> list[dict]:
    """POST each photo to /predictions/<name>?topk=5 of a real app built from `entry`; the JSON answers."""
    app = create_app(build_config({"models": [entry]}))
    try:
        client = app.test_client()
        answers = []
        for data in photos:
            response = client.post(f"/predictions/{entry['name']}?topk=5", data=data, content_type="application/octet-stream")
            assert response.status_code == 200, response.json
            answers.append(response.json)
        return answers
    finally:
        app.extensions["serve"].close()


def timm_probs(model: torch.nn.Module, data_config: dict, data: bytes) -> torch.Tensor:
    """What the model answers in-process through timm's own eval transform (create_transform)."""
    from timm.data import create_transform

    transform = create_transform(**data_config)
    with torch.no_grad():
        return model.eval()(transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)).softmax(-1)[0]


def assert_same_answer(answer: dict, probs: torch.Tensor) -> None:
    """Identical top-5 classes, probabilities within 1e-5 (the server rounds to 6 decimals)."""
    top = probs.topk(5)
    assert [p["index"] for p in answer["predictions"]] == top.indices.tolist()
    for got, want in zip(answer["predictions"], top.values.tolist()):
        assert abs(got["probability"] - want) <= 1e-5, (got, want)
