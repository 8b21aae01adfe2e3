"""The peer: a Flask + ONNX Runtime app as a competent user writes it by hand (bench/tail.py runs it).

Run it with gunicorn's sync workers and --preload, so the model is exported once, in the master:
    BENCH_ARCH=resnet18 BENCH_CHECKPOINT=r18.pth BENCH_ONNX=/tmp/r18.onnx \
        gunicorn -w 2 --preload -b 127.0.0.1:8001 --chdir bench flask_ort_app:app
Each worker makes its own 1-thread ONNX Runtime session on its first request (sessions don't survive
fork). JPEGs are decoded at reduced scale (draft), preprocessing is numpy. BENCH_KWARGS (JSON),
BENCH_MEAN / BENCH_STD (JSON lists) as bench/naive_app.py takes them.
"""
import io
import json
import os

import numpy as np
import onnxruntime as ort
import torch
from flask import Flask, jsonify, request
from PIL import Image

from serve.formats.state_dict import build_module  # only to build the same architecture

ONNX = os.environ["BENCH_ONNX"]
if not os.path.exists(ONNX):  # exported once, at start
    torch.set_num_threads(1)  # before the fork: an OpenMP pool the master started hangs a worker at exit
    model = build_module(os.environ["BENCH_ARCH"], json.loads(os.environ.get("BENCH_KWARGS", "{}")))
    model.load_state_dict(torch.load(os.environ["BENCH_CHECKPOINT"], map_location="cpu"))
    torch.onnx.export(model.eval(), torch.zeros(1, 3, 224, 224), ONNX, input_names=["x"], output_names=["y"],
                      dynamo=False)
MEAN = np.array(json.loads(os.environ.get("BENCH_MEAN", "[0.485, 0.456, 0.406]")), np.float32) * 255
STD = np.array(json.loads(os.environ.get("BENCH_STD", "[0.229, 0.224, 0.225]")), np.float32) * 255
session = None
app = Flask(__name__)


def get_session() -> ort.InferenceSession:
    global session
    if session is None:  # in the worker, after the fork
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(ONNX, options, providers=["CPUExecutionProvider"])
    return session


def preprocess(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (256, 256))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers 256
    image = image.convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return ((x - MEAN) / STD).transpose(2, 0, 1)[None]


@app.route("/predict", methods=["POST"])
def predict():
    logits = get_session().run(None, {"x": preprocess(request.get_data())})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(probs)[::-1][:5]
    return jsonify([{"index": int(i), "probability": float(probs[i])} for i in top])
