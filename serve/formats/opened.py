"""What the self-contained formats' readers share: the format names, and Opened and Implied (what a reader returns)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

TORCHSCRIPT = "TorchScript"
EXPORTED = "torch.export program"
MAR = "TorchServe archive"


@dataclass(frozen=True)
class Implied:
    """What a checkpoint says about its model; a value the config sets explicitly wins (apply_implied)."""

    task: str | None = None
    labels: tuple[str, ...] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessSpec fields


@dataclass(frozen=True)
class Opened:
    """A module read from a self-contained checkpoint, before it is placed on its device; or, for a
    model only its own runtime runs (ONNX in an archive), that runtime and no module."""

    module: nn.Module | None
    layout: str
    implied: Implied = Implied()
    skipped_keys: tuple[str, ...] = ()
    runtime: Any = None
