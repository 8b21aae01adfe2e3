"""Building: export a module (or take its cached export), check it against eager, return its OnnxRuntime."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.cores import available_cores
from serve.errors import ExportError
from serve.extras import require
from serve.runtimes.onnx.cache import cache_key, cache_paths, key_parts, read_cached, write_cached
from serve.runtimes.onnx.export import EXPORTER_PROP, KEY_PROP, LAYOUT_PROP, export_onnx, with_metadata
from serve.runtimes.onnx.layout import flatten
from serve.runtimes.onnx.reasons import first_line
from serve.runtimes.onnx.session import OnnxRuntime, check_cuda_provider
from serve.tasks.classify import Classify

log = logging.getLogger(__package__)

Verify = Callable[[Any, Any, float], str | None]  # a task's verify_runtime


def build_onnx_runtime(module: nn.Module, sample: torch.Tensor, *, cache_key_parts: Mapping[str, Any],
                       cache_dir: Path | None, verify: Verify | None = Classify.verify_runtime,
                       dynamic_hw: bool = False, device: torch.device | str = "cpu", threads: int | None = None,
                       load_threads: int | None = None, exporter: str = "auto",
                       score_threshold: float = 0.5) -> OnnxRuntime:
    """Export module (or take its cached export), check it against eager with `verify`, return the runtime.

    sample: a float32 batch [N, C, H, W] as forward will get (the shape is part of the cache key).
    cache_key_parts: what identifies the weights and the model (checkpoint sha256, architecture,
    kwargs, task). cache_dir: None, no cache; one that can't be written is used read-only (the export
    is kept in memory, a warning logged). threads, load_threads: see OnnxRuntime (threads defaults to
    the cores available). verify: a task's verify_runtime(eager, runtime, score_threshold), None when
    the outputs agree, else the reason (its function's name names the rule in the message); None skips
    the check. The ONNX side of the check runs in a forked child (the fork rule).

    Raises:
        ExportError: the export, the check or the device failed; the message is the reason.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, "ONNX Runtime", ExportError)
    device = torch.device(device)
    if device.type == "cuda":
        check_cuda_provider(device)
    module.eval()
    sample = sample.detach().to(device, torch.float32)
    try:
        with torch.inference_mode():
            eager = _call(module, sample)
    except Exception as exc:  # the user's module: any failure is a reason to run it eagerly (and fail there)
        raise ExportError(f"the module fails on a sample {list(sample.shape)}: {first_line(exc)}") from None
    layout, _ = flatten(eager)
    parts = key_parts(cache_key_parts, module, sample, dynamic_hw=dynamic_hw, layout=layout, exporter=exporter)
    key = cache_key(parts)
    info: dict[str, Any] = {"cache": "disabled", "export_s": None, "exporter": None}
    data = None
    if cache_dir is not None:
        data, props, problem = read_cached(Path(cache_dir), key)
        if data is not None:
            info.update(cache="hit", exporter=props.get(EXPORTER_PROP))
            log.info("ONNX cache hit: %s", cache_paths(Path(cache_dir), key)[0])
        elif problem:
            log.warning("ONNX cache file %s is not used: %s; exporting again",
                        cache_paths(Path(cache_dir), key)[0], problem)
            info["cache_note"] = f"rebuilt: {problem}"
    if data is None:
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # tracing needs ordinary tensors
            raw, used, traced = export_onnx(module, sample, layout, dynamic_hw=dynamic_hw, exporter=exporter)
        data = with_metadata(raw, {KEY_PROP: key, LAYOUT_PROP: json.dumps(layout), EXPORTER_PROP: used})
        info.update(export_s=round(time.perf_counter() - started, 3), exporter=used, trace_warnings=traced)
        if cache_dir is not None:
            problem = write_cached(Path(cache_dir), key, data, parts)
            if problem is None:
                info["cache"] = "miss"
            else:
                log.warning("ONNX cache directory can't be written: %s; the export is kept in memory only", problem)
                info.update(cache="unwritable", cache_note=f"not written: {problem}")
    runtime = OnnxRuntime(data, layout, device=device, threads=threads or available_cores(),
                          load_threads=load_threads, info=info)
    if verify is not None:
        started = time.perf_counter()
        reason = check_against_eager(runtime, module, sample, verify, dynamic_hw=dynamic_hw,
                                     score_threshold=score_threshold)
        runtime.info["verify_s"] = round(time.perf_counter() - started, 3)
        if reason is not None:
            warned = info.get("trace_warnings")
            hint = f" (the exporter warned: {warned[0]})" if warned else ""
            raise ExportError(f"ONNX output differs from eager ({verify.__name__} rule): {reason}{hint}")
    return runtime


def _call(module: nn.Module, batch: torch.Tensor) -> Any:
    """module(batch); a module that takes a list of images (torchvision detection) gets one."""
    try:
        return module(batch)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return module(list(batch))


def verification_inputs(sample: torch.Tensor, dynamic_hw: bool = False) -> list[torch.Tensor]:
    """The sample, and 3 seeded normal-random images (another batch size, other values and, with dynamic
    height and width, another size): an input the export never saw, for traced-in Python branches."""
    n, c, h, w = sample.shape
    if dynamic_hw:
        h, w = h + 32, max(32, w - 32)
    noise = torch.randn((3, c, h, w), generator=torch.Generator().manual_seed(0)).to(sample.device)
    return [sample, noise]


def check_against_eager(runtime: OnnxRuntime, module: nn.Module, sample: torch.Tensor, verify: Verify, *,
                        dynamic_hw: bool = False, score_threshold: float = 0.5,
                        batches: list[torch.Tensor | list[torch.Tensor]] | None = None) -> str | None:
    """Run eager here and ONNX (forward_isolated) on batches (by default verification_inputs); None when
    verify finds every pair in agreement, else the first reason, saying on which input.

    Raises:
        ExportError: ONNX Runtime can't open or run the model.
    """
    batches = verification_inputs(sample, dynamic_hw) if batches is None else batches
    with torch.inference_mode():
        eager = [_call(module, batch) for batch in batches]
    onnx_outputs = runtime.forward_isolated(*batches)
    for i, (batch, e, o) in enumerate(zip(batches, eager, onnx_outputs)):
        reason = verify(e, o, score_threshold)
        if reason is not None:
            if not isinstance(batch, torch.Tensor):  # a list of images (detector_inputs)
                what = f"random images {[list(x.shape) for x in batch]}"
            else:
                what = "the export sample" if i == 0 else f"a random batch of {len(batch)} {list(batch.shape[1:])}"
            return f"on {what}: {reason}"
    return None
