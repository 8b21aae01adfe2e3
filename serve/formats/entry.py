"""A models.yaml entry inferred from a checkpoint (`python -m serve inspect FILE --config`).

What the file answers is filled in; what it can't (usually the class, always the labels of a bare
state_dict) is a `<...>` placeholder that fails config validation loudly until it is replaced.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from serve.errors import CheckpointError, ConfigError
from serve.formats import training, transformers_folder
from serve.formats.timm_folder import (TIMM_SCHEME, folder_fields, is_model_folder, is_transformers_folder,
                                      preprocess_fields)

ARCHITECTURE_PLACEHOLDER = "<package.module:Class, a torchvision name, or timm:<name>>"
LABELS_PLACEHOLDER = "<labels.txt, one class name a line>"
# Classifier weights under these names give the class count.
HEADS = ("fc.weight", "head.fc.weight", "head.weight", "classifier.weight", "classifier.1.weight",
         "classifier.3.weight", "last_linear.weight", "heads.head.weight")


def suggest_entry(path: Path, obj: Any, find_state_dict, safe_globals: tuple[str, ...] = ()) -> list[str]:
    """The lines of one models.yaml entry for `path` (a file already read into `obj`, or a model folder)."""
    lines = [f"# models.yaml entry inferred from {path}; replace every <...>", f"- name: {_name(path)}"]
    if is_transformers_folder(path):
        return lines + _transformers_lines(path)
    if is_model_folder(path):
        lines.append(f"  checkpoint: {path}")
        lines.append("  # from the folder's config.json (override any of them here):")
        lines += [f"  #   {k}: {_flow(v)}" for k, v in folder_fields(path, _name(path)).items()]
        return lines
    fields: dict[str, Any] = {}
    comments: dict[str, str] = {}
    try:
        weights, layout = find_state_dict(obj)
    except CheckpointError as exc:
        weights, layout = None, ""
        candidates = [k for k, v in obj.items() if _is_weights(v)] if isinstance(obj, Mapping) else []
        fields["state_dict_key"] = f"<one of {candidates}>" if candidates else "<not found>"
        comments["state_dict_key"] = exc.message[:120]
    weights = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    timm_name, timm_args = _timm_model(obj)
    fields["architecture"] = TIMM_SCHEME + timm_name if timm_name else ARCHITECTURE_PLACEHOLDER
    if timm_name:
        comments["architecture"] = "the args saved with the checkpoint name it"
    classes = _num_classes(weights, timm_args)
    if classes:
        fields["kwargs"] = {"num_classes": classes[0]}
        comments["kwargs"] = classes[1]
    fields["checkpoint"] = str(path)
    if isinstance(obj, Mapping) and (ema := training.ema_entry(obj, _is_weights)):
        fields["weights"] = "default"
        comments["weights"] = f"or ema: the EMA weights in '{ema}' (usually the better ones)"
    if weights and (prefix := _common_prefix(list(weights))):
        comments["checkpoint"] = (f"every key starts with '{prefix}': stripped when the rest fit the architecture "
                                  f"(strip_prefix: '{prefix}' says so outright)")
    if safe_globals:
        fields["safe_globals"] = list(safe_globals)
    fields["labels"] = LABELS_PLACEHOLDER
    fields["preprocess"] = _timm_preprocess(timm_name, timm_args) if timm_name else {
        "resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    comments["preprocess"] = ("timm's eval transform for these args" if timm_name
                              else "ImageNet defaults: set your training's eval transform")
    if layout:
        lines.append(f"  # weights: {layout}")
    for key, value in fields.items():
        comment = f"  # {comments[key]}" if key in comments else ""
        lines.append(f"  {key}: {_flow(value)}{comment}")
    return lines


def _transformers_lines(folder: Path) -> list[str]:
    """A transformers folder's entry: the checkpoint, and what it implies as comments; a trust_code
    placeholder for a folder whose model is code of its own (auto_map), a preprocess one where its
    image processor isn't reproduced.

    Raises:
        ConfigError: the folder's model class is unknown or of a family not served.
    """
    name = _name(folder)
    cfg = transformers_folder.read_json(folder / "config.json", name)
    lines = [f"  checkpoint: {folder}"]
    if cfg.get("auto_map"):
        placeholder = (f"<true only if you trust the folder: config.json's auto_map names its code, "
                       f"{_flow(cfg['auto_map'])}>")
        lines.append(f"  trust_code: {_flow(placeholder)}")
    fields = transformers_folder.folder_fields(folder, name, trust_code=True, own_preprocess=True)
    try:
        fields["preprocess"] = transformers_folder.preprocess_fields(folder, fields["task"], name)
    except ConfigError as exc:
        placeholder = f"<{{resize, crop, mean, std, interpolation}}: {exc.message.split(': ', 2)[-1]}>"
        lines.append(f"  preprocess: {_flow(placeholder)}")
    lines.append("  # from the folder's config.json and preprocessor_config.json (override any of them here):")
    lines.append(f"  #   task: {fields['task']}   ({fields['class']})")
    lines += [f"  #   {k}: {_flow(fields[k])}" for k in ("labels", "preprocess") if k in fields]
    return lines


def _name(path: Path) -> str:
    stem = path.name.split(".")[0].lower() if path.is_file() else path.name.lower()
    return re.sub(r"[^a-z0-9_.-]", "_", stem).lstrip("._-")[:64] or "model"


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _timm_model(obj: Any) -> tuple[str | None, dict]:
    """The timm model name a timm train.py checkpoint (args.model) or a Lightning checkpoint's
    hyper_parameters (model_name / model / arch) record, if timm knows it."""
    if not isinstance(obj, Mapping):
        return None, {}
    args = obj.get("args")
    found = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, Mapping) else {}
    hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), Mapping) else {}
    for source in (found, hparams):
        for key in ("model", "model_name", "arch", "architecture"):
            name = source.get(key)
            if isinstance(name, str) and _is_timm_model(name):
                return name, dict(source)
    return None, {}


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def _num_classes(weights: Mapping | None, args: Mapping) -> tuple[int, str] | None:
    if isinstance(args.get("num_classes"), int):
        return args["num_classes"], "from the saved args"
    if not weights:
        return None
    prefix = _common_prefix(list(weights)) or ""
    for key in HEADS:
        tensor = weights.get(prefix + key)
        if isinstance(tensor, torch.Tensor) and tensor.ndim == 2:
            return tensor.shape[0], f"rows of {prefix + key} {list(tensor.shape)}"
    return None


def _common_prefix(keys: list[str]) -> str | None:
    """The first dotted component, when every key has the same one and it isn't the whole key."""
    first = {k.split(".")[0] for k in keys}
    if len(first) == 1 and all("." in k for k in keys):
        return first.pop() + "."
    return None


def _timm_preprocess(name: str, args: Mapping) -> dict[str, Any]:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    data_config = resolve_data_config(args={k: v for k, v in args.items() if v not in (None, "")},
                                      pretrained_cfg=cfg.to_dict() if cfg else {})
    return preprocess_fields(data_config)
