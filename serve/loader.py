"""Model loading: a spec's checkpoint, whatever its format (serve/formats/), -> module on its device,
in eval mode; its labels."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serve.config import ModelSpec
from serve.errors import CheckpointError, ConfigError, DeviceError, ExportError
from serve.formats import safe_globals, transformers_folder
from serve.formats.opened import Implied
from serve.formats.packaged import open_model
from serve.formats.state_dict import build_module, find_state_dict, load_weights, read_checkpoint, weights_path
from serve.formats.timm_folder import is_transformers_folder
from serve.runtimes.onnx import open_onnx_file
from serve.sources.cache import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A module ready for inference, and what was learned while loading it."""

    module: nn.Module
    device: torch.device
    layout: str
    sha256: str
    load_time_s: float
    skipped_keys: tuple[str, ...] = ()
    implied: Implied | None = None  # what a self-contained checkpoint says (task, labels, preprocess)
    runtime: Any = None  # a file only its own runtime runs (an .onnx checkpoint: its OnnxRuntime); module is None


def resolve_device(name: str) -> torch.device:
    """Turn cpu | cuda | cuda:N | auto into a device that exists here.

    Raises:
        DeviceError: a GPU was asked for that this machine doesn't have.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(name)
    index = device.index or 0
    if index >= count:
        found = f"found {count} CUDA device{'s' if count != 1 else ''}"
        raise DeviceError(f"device '{name}' not available ({found})")
    return torch.device("cuda", index)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the spec's module, load its checkpoint onto its device and put it in eval mode.

    Raises:
        ConfigError, DeviceError, CheckpointError: prefixed with the model's name.
    """
    started = time.perf_counter()
    try:
        device = resolve_device(spec.device)
        path = weights_path(spec.checkpoint)
        digest = file_sha256(path)
        if spec.sha256 and digest != spec.sha256.lower():
            raise CheckpointError(f"checkpoint {path} sha256 is {digest}, config expects {spec.sha256}")
        if path.suffix.lower() == ".onnx":  # an ONNX model needs no class: ONNX Runtime runs it as it is
            try:
                runtime = open_onnx_file(path, device)
            except ExportError as exc:
                raise CheckpointError(exc.message) from None
            elapsed = time.perf_counter() - started
            log.info("model '%s' opened from %s (ONNX) in %.2fs", spec.name, path.name, elapsed)
            return LoadedModel(None, device, "ONNX model", digest, elapsed, runtime=runtime)
        # TorchScript, torch.export programs and TorchServe archives carry their model (serve/formats/packaged.py);
        # a transformers folder's config.json names its class (serve/formats/transformers_folder.py).
        if is_transformers_folder(spec.checkpoint):
            opened = transformers_folder.open_model(spec, device)
        else:
            opened = open_model(spec, device)
        implied = opened.implied if opened is not None else None
        if opened is not None and opened.runtime is not None:  # ONNX in an archive: no module
            elapsed = time.perf_counter() - started
            return LoadedModel(None, device, opened.layout, digest, elapsed, implied=implied, runtime=opened.runtime)
        if opened is not None:
            module, layout, skipped = opened.module, opened.layout, opened.skipped_keys
        else:
            allowed = safe_globals.resolve_safe_globals(spec.safe_globals, spec.name)
            obj = read_checkpoint(path, device, trust_pickle=spec.trust_pickle, allowed=allowed)
            weights, layout = find_state_dict(obj, spec.state_dict_key, spec.weights)
            skipped: tuple[str, ...] = ()
            if isinstance(weights, nn.Module) and spec.architecture is None:
                module = weights
            elif spec.architecture is None:
                raise ConfigError(
                    f"model '{spec.name}': field 'architecture': required for a state_dict checkpoint "
                    f"({layout}); only a TorchScript file, a torch.export program, a TorchServe archive or a "
                    f"trusted whole-model pickle carries its own"
                )
            else:
                module = build_module(spec.architecture, spec.kwargs, spec.name)
                if isinstance(weights, nn.Module):
                    weights = weights.state_dict()
                skipped, note = load_weights(module, weights, spec.strict, spec.strip_prefix)
                layout += note
            del obj, weights
        module = module.to(device).eval()
        if spec.half and device.type == "cuda":
            module = module.half()
        elif spec.half:
            log.warning("model '%s': half is ignored on the CPU", spec.name)
        if spec.channels_last:
            module = module.to(memory_format=torch.channels_last)
    except (ConfigError, CheckpointError, DeviceError) as exc:
        message = exc.message if exc.message.startswith("model '") else f"model '{spec.name}': {exc.message}"
        raise type(exc)(message) from None
    elapsed = time.perf_counter() - started
    log.info("model '%s' loaded from %s (%s) on %s in %.2fs", spec.name, spec.checkpoint.name, layout, device, elapsed)
    return LoadedModel(module, device, layout, digest, elapsed, skipped, implied)


def load_labels(spec: ModelSpec) -> tuple[str, ...] | None:
    """Read the spec's labels: an inline list, a text file (one per line), or torchvision:<Weights>.

    Raises:
        ConfigError: the file or the torchvision weights entry can't be read.
    """
    labels = spec.labels
    where = f"model '{spec.name}': field 'labels'"
    if labels is None or isinstance(labels, tuple):
        return labels
    if isinstance(labels, str):
        import torchvision

        name = labels.split(":", 1)[1]
        try:
            return tuple(torchvision.models.get_weight(name).meta["categories"])
        except (ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{where}: no torchvision weights '{name}' with categories ({exc})") from None
    try:
        lines = labels.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {labels}: {exc.strerror or exc}") from None
    return tuple(line.strip() for line in lines if line.strip())
