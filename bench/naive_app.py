"""The baseline: a one-file Flask app as a tutorial writes it (decode + transform + forward per request).

Run by bench/bench.py under gunicorn with the same worker count as the server. It takes the model
from BENCH_ARCH / BENCH_KWARGS (JSON) / BENCH_CHECKPOINT / BENCH_MEAN / BENCH_STD.
"""
import io
import json
import os

import torch
import torchvision.transforms as T
from flask import Flask, jsonify, request
from PIL import Image

from serve.formats.state_dict import (
    build_module,  # only to build the same architecture; loading is the tutorial's
)

model = build_module(os.environ["BENCH_ARCH"], json.loads(os.environ.get("BENCH_KWARGS", "{}")))
model.load_state_dict(torch.load(os.environ["BENCH_CHECKPOINT"], map_location="cpu"))
model.eval()
transform = T.Compose([
    T.Resize(256),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize(json.loads(os.environ["BENCH_MEAN"]), json.loads(os.environ["BENCH_STD"])),
])
app = Flask(__name__)


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(io.BytesIO(request.get_data())).convert("RGB")
    x = transform(image).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = probs.topk(5)
    return jsonify([{"index": i, "probability": p} for p, i in zip(top.values.tolist(), top.indices.tolist())])
