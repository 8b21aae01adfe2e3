"""Checkpoints that package their own model (TorchScript, torch.export programs, TorchServe archives):
which one a file is, by its content, reading it, and what it implies about the model it holds."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from serve.config import ModelSpec
from serve.errors import CheckpointError
from serve.formats import exported, mar, torchscript
from serve.formats.opened import EXPORTED, MAR, TORCHSCRIPT, Implied, Opened

# Each format's reader module, in detection order (an archive first: it may hold the others).
READERS = {MAR: mar, TORCHSCRIPT: torchscript, EXPORTED: exported}


def zip_names(path: Path) -> list[str] | None:
    """The member names of a zip file, or None for anything else (a missing or legacy file included)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def detect(path: Path) -> str | None:
    """Which self-contained format a file is, from its zip layout (not its suffix); None for a
    torch.save or safetensors file, which the state_dict loader reads."""
    names = zip_names(Path(path))
    if names is None:
        return None
    return next((kind for kind, reader in READERS.items() if reader.matches(names)), None)


def open_model(spec: ModelSpec, device: torch.device) -> Opened | None:
    """Read the spec's checkpoint if it is a self-contained format; None if it is not one.

    Raises:
        CheckpointError: the file is one of these formats but can't be served, or needs consent.
        ConfigError: the config doesn't fit what the file holds.
    """
    kind = detect(spec.checkpoint)
    return None if kind is None else READERS[kind].open_model(spec, device)


def describe(path: Path) -> list[tuple[str, str]] | None:
    """`python -m serve inspect`'s lines for a self-contained checkpoint, read without running any of
    its code; None for other files.

    Raises:
        CheckpointError: the file is one of these formats but unreadable.
    """
    kind = detect(path)
    return None if kind is None else [("format", kind), *READERS[kind].describe(Path(path))]


def apply_implied(spec: ModelSpec, implied: Implied | None) -> ModelSpec:
    """The spec with what the checkpoint implies filled in wherever the config left a field unset
    (field by field inside preprocess).

    Raises:
        CheckpointError: the implied values don't validate (they come from the file).
    """
    if implied is None:
        return spec
    update: dict[str, Any] = {}
    if implied.task is not None and "task" not in spec.model_fields_set:
        update["task"] = implied.task
    if implied.labels is not None and "labels" not in spec.model_fields_set:
        update["labels"] = implied.labels
    if implied.preprocess:
        own = spec.preprocess.model_fields_set if "preprocess" in spec.model_fields_set else set()
        merged = {k: v for k, v in implied.preprocess.items() if k not in own}
        if merged:
            update["preprocess"] = {**spec.preprocess.model_dump(), **merged}
    if not update:
        return spec
    data = spec.model_dump(exclude_unset=True)
    options = data.pop("task_options", None)  # given back under the task's name, where the config had them
    if options and update.get("task", spec.task) == spec.task:
        data[spec.task] = options
    try:
        return ModelSpec.model_validate({**data, **update})
    except ValueError as exc:
        raise CheckpointError(f"model '{spec.name}': what {spec.checkpoint.name} implies is invalid: {exc}") from None
