"""ONNX Runtime serving: a module exported to ONNX once (cached on disk), checked against eager, run by ONNX Runtime.

    runtime = build_onnx_runtime(module, sample, cache_key_parts={...}, cache_dir=path, verify=task.verify_runtime)
    runtime.forward(batch)     # float32 [N, C, H, W], normalized -> what module(batch) returns, as CPU tensors
    runtime.describe()         # {"runtime": "onnxruntime", "export_s", "cache", "providers", "threads", ...}
    open_onnx_file(path)       # an .onnx checkpoint, with its external data beside it, served as it is

Every failure (export, verification, a file ONNX Runtime can't use) raises ExportError whose message is
the reason; the caller runs the module eagerly instead (or refuses an .onnx checkpoint).

The fork rule: a process that forks workers later (the gunicorn master with preload) never imports
onnxruntime; it is imported only where a session is made (session.py), and checks made before the fork
run ONNX Runtime in a forked child (isolate.py). docs/runtimes.md is the reference, with measurements.
"""
from __future__ import annotations

from serve.runtimes.onnx.build import build_onnx_runtime
from serve.runtimes.onnx.files import open_onnx_bytes, open_onnx_file
from serve.runtimes.onnx.session import OnnxRuntime

__all__ = ["OnnxRuntime", "build_onnx_runtime", "open_onnx_bytes", "open_onnx_file"]
