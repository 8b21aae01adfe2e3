"""Weights inside training checkpoints: the EMA entry when asked for, and the key prefix a wrapper added.

A timm train.py checkpoint holds `state_dict` and `state_dict_ema`; a Lightning `.ckpt` holds the
LightningModule's state_dict, whose keys carry the attribute the network hangs from (`model.`,
`net.`, `backbone.`...). The network itself wants neither.
"""
from __future__ import annotations

import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from serve.errors import CheckpointError

# Where trainers keep an exponential moving average of the weights, in order of preference: timm's
# train.py (state_dict_ema; model_ema in older scripts), then names hand-written loops use.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "model_ema_state_dict", "ema_model", "ema")


def ema_entry(obj: Mapping, is_weights) -> str | None:
    """The key of the checkpoint's EMA weights, or None if it has none."""
    return next((k for k in EMA_KEYS if k in obj and is_weights(obj[k])), None)


def select_ema(obj: Mapping, is_weights) -> tuple[Mapping[str, torch.Tensor], str]:
    """The EMA weights of a training checkpoint (`weights: ema`), and a layout note.

    Raises:
        CheckpointError: the checkpoint holds no EMA weights.
    """
    key = ema_entry(obj, is_weights)
    if key is None:
        keys = [str(k) for k in list(obj)[:20]]
        raise CheckpointError(f"weights: ema, but the checkpoint has no EMA weights (looked for {list(EMA_KEYS)}); "
                              f"its keys: {keys}")
    return obj[key], f"dict entry '{key}' (EMA weights)"


def fit_prefix(keys: Collection[str], own: Collection[str]) -> str | None:
    """The dotted prefix every key shares whose removal makes the keys exactly the module's, if one does.

    Nothing is stripped when the keys already fit, or when removing a prefix only makes them fit
    partly: a guess that loads some weights and drops others would be worse than the key diff.
    """
    own_set = set(own)
    if not keys or set(keys) == own_set:
        return None
    parts = next(iter(keys)).split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if not all(k.startswith(prefix) for k in keys):
            return None
        if {k[len(prefix):] for k in keys} == own_set:
            return prefix
    return None


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    """The entries under `prefix`, without it, and how many other entries were left out.

    Raises:
        CheckpointError: no key starts with the prefix.
    """
    kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        starts = sorted({k.split(".")[0] + "." for k in state_dict})[:10]
        raise CheckpointError(f"strip_prefix '{prefix}': no key starts with it; the keys start with {starts}")
    return kept, len(state_dict) - len(kept)


def prefix_hint(keys: Collection[str], own: Collection[str]) -> str:
    """For a failed strict load: a strip_prefix that would make a subset of the keys fit exactly, if any."""
    own_set = set(own)
    prefixes = {".".join(k.split(".")[:depth]) + "." for k in keys for depth in (1, 2) if k.count(".") >= depth}
    for prefix in sorted(prefixes):
        under = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if under == own_set:
            others = sum(not k.startswith(prefix) for k in keys)
            return f"; the keys under '{prefix}' fit exactly: set strip_prefix: '{prefix}' ({others} other keys are then ignored)"
    return ""


def lightning_hint(path: Path) -> str:
    """For a refused global: where a Lightning checkpoint keeps arbitrary objects (read from the raw
    pickle bytes, nothing unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = archive.read(name) if name else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return ""
    if b"pytorch-lightning_version" not in data or b"hyper_parameters" not in data:
        return ""
    return (" (this is a Lightning checkpoint: such objects usually sit in hyper_parameters, the __init__ "
            "arguments save_hyperparameters() recorded; save with save_hyperparameters(ignore=[...]) for "
            "objects that aren't plain data)")
