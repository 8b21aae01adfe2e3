"""TorchScript files (torch.jit.save of a scripted or traced module), read with torch.jit.load.

What loading runs: torch.jit.load restores data.pkl and constants.pkl with TorchScript's own C++
unpickler, which knows tensors and TorchScript classes only: it never imports or calls Python, and a
pickle that names a Python callable is refused ("Unknown type name '__builtin__.exec'"). The model's
code is TorchScript, run by the TorchScript interpreter at forward, not Python. torch's docs still
warn that crafted data may execute code during torch.jit.load (through bugs in that C++ reader), so,
as for any model file, serve only files whose origin you trust.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch

from serve.config import ModelSpec
from serve.errors import CheckpointError, ConfigError
from serve.formats.opened import TORCHSCRIPT, Opened
from serve.formats.state_dict import error_line


def matches(names: list[str]) -> bool:
    """torch.jit.save's zip layout: one top folder holding data.pkl, constants.pkl and code/ (a
    torch.save zip has data.pkl but neither of the others)."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return False
    root = roots.pop()
    return (f"{root}/data.pkl" in names and f"{root}/constants.pkl" in names
            and any(name.startswith(f"{root}/code/") for name in names))


def read(source: Path | BinaryIO, device: torch.device | str, where: str) -> torch.jit.ScriptModule:
    """torch.jit.load onto `device`, in eval mode.

    Raises:
        CheckpointError: the file is damaged or not loadable by this torch.
    """
    try:
        module = torch.jit.load(source, map_location=device)
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"TorchScript file {where} could not be loaded: {error_line(exc)}") from None
    return module.eval()


def refuse_architecture(spec: ModelSpec, kind: str) -> None:
    """A file that packages its model: an architecture, or a field that picks weights out of a
    state_dict, would be silently unused.

    Raises:
        ConfigError: one of those fields is set.
    """
    for name in ("architecture", "kwargs", "state_dict_key", "strip_prefix", "safe_globals"):
        if getattr(spec, name):
            raise ConfigError(
                f"model '{spec.name}': field '{name}': {spec.checkpoint.name} is a {kind}, which carries "
                f"its own model; remove '{name}'"
            )


def open_model(spec: ModelSpec, device: torch.device) -> Opened:
    """Raises: CheckpointError, ConfigError: see read and refuse_architecture."""
    refuse_architecture(spec, f"{TORCHSCRIPT} file")
    module = read(spec.checkpoint, device, str(spec.checkpoint))
    return Opened(module, f"TorchScript ({module.original_name})")


def describe(path: Path) -> list[tuple[str, str]]:
    """Raises: CheckpointError: the file can't be loaded."""
    module = read(path, "cpu", str(path))
    return summary(module)


def summary(module: torch.jit.ScriptModule) -> list[tuple[str, str]]:
    state = module.state_dict()
    values = sum(t.numel() for t in state.values())
    return [
        ("module", f"{module.original_name}, {len(state)} tensors, {values:,} values"),
        ("forward", str(module.forward.schema)),
    ]
