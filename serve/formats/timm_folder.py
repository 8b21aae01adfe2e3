"""A timm / Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin, as
timm.models.save_for_hf writes it): the weights file, and the config fields the folder answers. A
transformers folder (save_pretrained's config.json) is told apart here and read by transformers_folder.py.

The folder says the architecture, the class count and names, the model's constructor arguments
and its eval preprocessing (pretrained_cfg); a models.yaml entry then needs only a name and the
folder. Preprocessing is resolved with timm's own resolve_data_config, so it is what timm's
create_transform would build.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from serve.errors import CheckpointError, ConfigError
from serve.extras import require

# The weights files timm reads from a local folder, in its order of preference (timm.models._hub).
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
TIMM_SCHEME = "timm:"


def is_model_folder(path: Path) -> bool:
    """A timm or a Hugging Face transformers model folder: config.json beside the weights."""
    return path.is_dir() and (path / "config.json").is_file()


def is_transformers_config(cfg: Any) -> bool:
    """Whether a parsed config.json is transformers' (`architectures` / `model_type`, as save_pretrained
    writes it) rather than timm's (`architecture`, `pretrained_cfg`, as save_for_hf writes it)."""
    return (isinstance(cfg, dict) and "architecture" not in cfg and "pretrained_cfg" not in cfg
            and (isinstance(cfg.get("architectures"), list) or isinstance(cfg.get("model_type"), str)))


def is_transformers_folder(path: Path) -> bool:
    """A model folder whose config.json is transformers'; an unreadable one counts as timm's (whose
    reader names the problem)."""
    if not is_model_folder(path):
        return False
    try:
        return is_transformers_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def is_timm_folder(path: Path) -> bool:
    return is_model_folder(path) and not is_transformers_folder(path)


def weights_file(folder: Path) -> Path:
    """The folder's weights file, safetensors first.

    Raises:
        CheckpointError: the folder holds none of WEIGHTS_FILES.
    """
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise CheckpointError(f"model folder {folder} holds no weights file ({', '.join(WEIGHTS_FILES)}); it holds {present}")


def read_config(folder: Path, model: str = "?") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """config.json as timm parses it: (architecture, model_args, pretrained_cfg with labels and class count).

    Raises:
        ConfigError: config.json is unreadable, not JSON, or names no architecture.
    """
    where = f"model '{model}': field 'checkpoint': {folder / 'config.json'}"
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise ConfigError(f"{where}: no 'architecture' string; not a timm model folder")
    if "pretrained_cfg" not in cfg:  # timm's legacy single-dict config
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
        cfg = {"architecture": cfg["architecture"], "pretrained_cfg": pretrained_cfg}
    pretrained_cfg = dict(cfg["pretrained_cfg"] or {})
    for key in ("num_classes", "label_names"):
        if key in cfg:
            pretrained_cfg[key] = cfg[key]
    model_args = dict(cfg.get("model_args") or {})
    # As timm's _parse_model_cfg: saved constructor arguments decide the input channels and size.
    input_size = pretrained_cfg.get("input_size", (3, 224, 224))
    if model_args.get("in_chans") is not None:
        pretrained_cfg["input_size"] = (model_args["in_chans"], *input_size[1:])
    if model_args.get("img_size") is not None and pretrained_cfg.get("fixed_input_size", False):
        size = model_args["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        pretrained_cfg["input_size"] = (pretrained_cfg["input_size"][0], *size)
    return cfg["architecture"], model_args, pretrained_cfg


def folder_fields(folder: Path, model: str = "?") -> dict[str, Any]:
    """The models.yaml fields a model folder answers: architecture, kwargs, labels, preprocess.

    Raises:
        ConfigError: the folder's config can't be served (see read_config; non-square or
            non-RGB input).
    """
    require("timm", f"model '{model}': a timm / Hugging Face model folder ({folder})")
    from timm.data import resolve_data_config

    architecture, model_args, pretrained_cfg = read_config(folder, model)
    kwargs = dict(model_args)
    if pretrained_cfg.get("num_classes") is not None:
        kwargs["num_classes"] = pretrained_cfg["num_classes"]
    fields: dict[str, Any] = {"architecture": TIMM_SCHEME + architecture, "kwargs": kwargs,
                              "preprocess": preprocess_fields(resolve_data_config(pretrained_cfg=pretrained_cfg), model)}
    labels = label_list(pretrained_cfg.get("label_names"), kwargs.get("num_classes"))
    if labels is not None:
        fields["labels"] = labels
    return fields


def preprocess_fields(data_config: dict[str, Any], model: str = "?") -> dict[str, Any]:
    """timm's data config (input_size, crop_pct, crop_mode, interpolation, mean, std) as a preprocess block.

    Raises:
        ConfigError: a non-square or non-RGB input size.
    """
    channels, height, width = data_config["input_size"]
    where = f"model '{model}': field 'checkpoint': the folder's input_size {tuple(data_config['input_size'])}"
    if height != width:
        raise ConfigError(f"{where} is not square; only square crops are served")
    if channels != 3:
        raise ConfigError(f"{where} has {channels} channels; only RGB (3) is served")
    return {
        "resize": math.floor(height / data_config["crop_pct"]),  # timm's scale_size
        "crop": height,
        "crop_mode": data_config["crop_mode"],
        "interpolation": data_config["interpolation"],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "exact": True,
    }


def label_list(names: Any, num_classes: int | None) -> list[str] | None:
    """timm's label_names (a list, or {index: name} with gaps) as one label per class."""
    if not names:
        return None
    if isinstance(names, dict):
        by_index = {int(k): str(v) for k, v in names.items()}
        count = num_classes or max(by_index) + 1
        return [by_index.get(i, str(i)) for i in range(count)]
    return [str(n) for n in names]
