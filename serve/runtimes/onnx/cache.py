"""The export cache: `<key>.onnx` and its `<key>.json` sidecar, keyed, written atomically, checked before use."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.runtimes.onnx.export import KEY_PROP, OPSET

CACHE_FORMAT = 1  # bump when the export recipe or the files' layout changes: old entries stop matching


def key_parts(cache_key_parts: Mapping[str, Any], module: nn.Module, sample: torch.Tensor, *, dynamic_hw: bool,
              layout: Mapping, exporter: str) -> dict[str, Any]:
    """What an export depends on: the caller's parts (checkpoint sha256, architecture, kwargs, task), the
    module's class, the input shape, dynamic axes, output layout, opset, exporter, this cache's format and
    the torch / onnx / onnxscript / onnxruntime versions."""
    return {
        **{k: v for k, v in cache_key_parts.items()},
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "input": list(sample.shape[1:]), "dynamic_hw": dynamic_hw, "layout": layout,
        "opset": OPSET, "exporter": exporter, "format": CACHE_FORMAT, **_versions(),
    }


def _versions() -> dict[str, str]:
    """torch / onnx / onnxscript / onnxruntime versions, read without importing onnxruntime (the fork rule)."""
    found = {"torch": torch.__version__}
    for name, dists in (("onnx", ("onnx",)), ("onnxscript", ("onnxscript",)),
                        ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
        for dist in dists:
            try:
                found[name] = f"{dist} {metadata.version(dist)}"
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found[name] = "missing"
    return found


def cache_key(parts: Mapping[str, Any]) -> str:
    """The sha256 of the parts as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """The model file and its sidecar for key."""
    return cache_dir / f"{key[:32]}.onnx", cache_dir / f"{key[:32]}.json"


def read_cached(cache_dir: Path, key: str) -> tuple[bytes | None, dict[str, str], str | None]:
    """The cached model for key and its metadata_props, or None and why not (None: no file; else what
    is wrong with it: unreadable, another key's sidecar, a sha256 mismatch, not ONNX, another key's model)."""
    model_path, meta_path = cache_paths(cache_dir, key)
    if not model_path.exists() and not meta_path.exists():
        return None, {}, None
    try:
        meta = json.loads(meta_path.read_text())
        data = model_path.read_bytes()
    except (OSError, ValueError) as exc:
        return None, {}, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None, {}, "its sidecar names another key"
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None, {}, f"sha256 mismatch ({len(data)} bytes: truncated or changed)"
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
        return None, {}, f"not an ONNX model ({type(exc).__name__})"
    if props.get(KEY_PROP) != key:
        return None, {}, "the ONNX model inside was made for another key"
    return data, props, None


def write_cached(cache_dir: Path, key: str, data: bytes, parts: Mapping[str, Any]) -> str | None:
    """Write model and sidecar, each to a temporary name then os.replace'd; None when done, else why not
    (the caller logs it)."""
    model_path, meta_path = cache_paths(cache_dir, key)
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest(), "parts": parts},
                      indent=1, sort_keys=True, default=str).encode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, content in ((model_path, data), (meta_path, meta)):
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        return f"{exc.strerror or exc} ({cache_dir})"
    return None
