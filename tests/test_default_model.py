"""The embedded default model is a real pretrained ImageNet classifier: real photos get the right labels."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from serve.app import create_app
from serve.config import DEFAULT_CONFIG_PATH, load_config


@pytest.fixture(scope="module")
def client():
    return create_app(load_config(DEFAULT_CONFIG_PATH, env={"SERVE_DEVICE": "cpu"})).test_client()


def photo(name: str) -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_cat_photo_is_a_cat(client, cat_jpeg):
    answer = client.post("/predictions/efficientnet_lite0", data=cat_jpeg, content_type="image/jpeg").json
    top = answer["predictions"][0]
    assert top["label"] in {"tiger cat", "Egyptian cat", "tabby"} and top["probability"] > 0.3
    assert [p["label"] for p in answer["predictions"][:3]].count("lynx") == 0


@pytest.mark.parametrize("name, label", [("coffee", "espresso"), ("rocket", "missile")])
def test_other_photos(client, name, label):
    answer = client.post("/predictions/efficientnet_lite0?topk=1", data=photo(name), content_type="image/jpeg").json
    assert answer["predictions"][0]["label"] == label


def test_default_metadata(client):
    meta = client.get("/models/efficientnet_lite0").json
    assert meta["num_classes"] == 1000 and meta["num_labels"] == 1000
    assert meta["checkpoint"]["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
