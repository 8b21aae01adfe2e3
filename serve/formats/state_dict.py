"""State_dict checkpoints: read without running pickled code, the weights found, the module built, the weights loaded."""
from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.errors import CheckpointError, ConfigError
from serve.extras import require
from serve.formats import safe_globals, training
from serve.formats.timm_folder import TIMM_SCHEME, is_model_folder, weights_file

# The logger these lines have always had (they were the loader's): log filters and tests key on it.
log = logging.getLogger("serve.loader")

# Keys under which training scripts commonly nest the model's weights, in order of preference.
COMMON_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
# Prefixes that wrappers add to every key: nn.DataParallel / DDP, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5


def build_module(architecture: str, kwargs: Mapping[str, Any], model: str = "?") -> nn.Module:
    """Build an untrained module from 'package.module:Name[.factory]' or a torchvision builder name.

    Raises:
        ConfigError: the name does not resolve or its call fails.
    """
    where = f"model '{model}': field 'architecture'"
    if architecture.startswith(TIMM_SCHEME):
        return _build_timm(architecture[len(TIMM_SCHEME):], kwargs, where)
    if ":" in architecture:
        target = safe_globals.import_reference(architecture, where)
    else:
        import torchvision

        if architecture.lower() not in torchvision.models.list_models():
            raise ConfigError(
                f"{where}: '{architecture}' is neither 'package.module:Name' nor a torchvision model name"
            )
        target = torchvision.models.get_model_builder(architecture.lower())
        kwargs = {"weights": None, **kwargs}
    if not callable(target):
        raise ConfigError(f"{where}: '{architecture}' is not callable")
    try:
        module = target(**kwargs)
    except Exception as exc:  # the user's constructor: any failure is a config problem
        raise ConfigError(f"{where}: calling '{architecture}' with kwargs {dict(kwargs)} failed: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: '{architecture}' returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _build_timm(name: str, kwargs: Mapping[str, Any], where: str) -> nn.Module:
    """timm.create_model(name, pretrained=False, **kwargs): the weights come from the checkpoint, never a hub."""
    require("timm", f"{where}: timm:{name}")
    import timm

    if kwargs.get("pretrained"):
        raise ConfigError(f"{where}: kwargs pretrained: true would download weights; they come from 'checkpoint'")
    if not timm.is_model(name):
        raise ConfigError(f"{where}: timm has no model '{name}' (timm {timm.__version__}; see timm.list_models())")
    try:
        return timm.create_model(name, **{**kwargs, "pretrained": False})
    except Exception as exc:  # timm's constructor: any failure is a config problem
        raise ConfigError(f"{where}: timm.create_model('{name}', **{dict(kwargs)}) failed: {exc}") from None


def read_checkpoint(path: Path, device: torch.device | str = "cpu", trust_pickle: bool = False,
                    allowed: Sequence[type] = ()) -> Any:
    """Deserialize a .pth/.pt/.ckpt/.safetensors file (or a model folder's weights file) onto `device`
    without running pickled code.

    Zip-format torch files are memory-mapped; legacy (pre-1.6) files are read whole. Besides tensors,
    only the harmless objects of serve/formats/safe_globals.py and the classes in `allowed` are
    unpickled; anything else (a whole-model pickle) only when trust_pickle is set.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt or untrusted file.
    """
    path = weights_path(Path(path))
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, device)
    mmap = zipfile.is_zipfile(path)
    try:
        with safe_globals.allowed(allowed):
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refusal = _refusal(exc, path)
        if refusal is None:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {error_line(exc)}") from None
        if not trust_pickle:
            raise CheckpointError(refusal) from None
    except Exception as exc:  # untrusted bytes: any failure to parse them means the file can't be used
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {error_line(exc)}") from None
    log.warning("unpickling %s with weights_only=False because trust_pickle is set: it can run code", path)
    try:
        return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as exc:  # arbitrary unpickling: any failure means the file can't be used
        raise CheckpointError(f"checkpoint {path} could not be unpickled: {error_line(exc)}") from None


def weights_path(path: Path) -> Path:
    """The file to read: the path itself, or a model folder's weights file.

    Raises:
        CheckpointError: nothing there, or a folder without config.json and weights.
    """
    if is_model_folder(path):
        return weights_file(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder without config.json (not a timm / Hugging Face model folder)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _refusal(exc: pickle.UnpicklingError, path: Path) -> str | None:
    """Why torch's weights_only unpickler refused the file, as the message to show; None if the file
    is just damaged."""
    text = str(exc)
    name = safe_globals.refused_global(text)
    if name is not None:
        allow = "" if name.split(".")[0] in safe_globals.BLOCKED_MODULES else (
            f" If '{name}' is plain data whose unpickling runs no code, add "
            f"'{safe_globals.as_config_name(name)}' to this model's safe_globals.")
        return (
            f"checkpoint {path} holds pickled Python objects ('{name}'), which can run arbitrary code when "
            f"loaded; refused{training.lightning_hint(path)}.{allow} A whole model saved with "
            f"torch.save(model): save model.state_dict() instead, or set trust_pickle: true for this model "
            f"if you trust the file"
        )
    if "not unpickled" in text or "does not match its" in text:
        reason = next(line for line in text.splitlines() if "not unpickled" in line or "does not match its" in line)
        return f"checkpoint {path} holds numpy data this server does not unpickle: {reason.strip()}"
    if _is_pickled_code(exc, path):
        return (
            f"checkpoint {path} holds pickled Python objects (e.g. a whole model saved with "
            f"torch.save(model), or a file written by pickle.dump), which can run arbitrary code "
            f"when loaded; refused. Save model.state_dict() instead, or set trust_pickle: true for "
            f"this model if you trust the file ({error_line(exc)})"
        )
    return None


def _read_safetensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {exc}") from None


def _is_pickled_code(exc: pickle.UnpicklingError, path: Path) -> bool:
    """torch's weights_only unpickler refused a global, or an opcode it doesn't read in a file that
    starts as a pickle does (pickle.dump's protocol 4 framing); a damaged file fails otherwise."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return False
    if "GLOBAL" in text or "global" in text:
        return True
    with path.open("rb") as f:
        return "Unsupported operand" in text and f.read(1) == pickle.PROTO


def error_line(exc: BaseException) -> str:
    """An exception's message in one line for an error of our own: its first non-blank line, at most
    300 characters; its type's name when it has no message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def find_state_dict(obj: Any, key: str | None = None,
                    weights: str = "default") -> tuple[Mapping[str, torch.Tensor] | nn.Module, str]:
    """Locate the model weights inside whatever a checkpoint file holds; return them and a layout note.

    weights="ema" takes a training checkpoint's EMA weights (serve/formats/training.py).

    Raises:
        CheckpointError: the key is absent, nothing looks like weights, several candidates exist, or
            EMA weights were asked for and there are none.
    """
    if weights == "ema" and isinstance(obj, Mapping):
        return training.select_ema(obj, is_state_dict)
    if weights == "ema":
        raise CheckpointError(f"weights: ema, but the checkpoint holds a {type(obj).__name__}, not a training checkpoint")
    if isinstance(obj, nn.Module):
        while isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            obj = obj.module
        return obj, f"whole-model pickle ({type(obj).__name__})"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict or a dict of them")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"state_dict_key '{key}' not in checkpoint; its keys: {_key_list(obj)}")
        found = obj[key]
        if isinstance(found, nn.Module):
            return find_state_dict(found)
        if not is_state_dict(found):
            raise CheckpointError(f"checkpoint['{key}'] is a {type(found).__name__}, not a state_dict of tensors")
        return found, f"dict entry '{key}'"
    if is_state_dict(obj):
        return obj, "bare state_dict"
    candidates = [k for k, v in obj.items() if is_state_dict(v)]
    common = [k for k in COMMON_KEYS if k in candidates]
    if len(common) == 1 or (common and len(candidates) == 1):
        ema = training.ema_entry(obj, is_state_dict)
        also = f" (EMA weights in '{ema}' too: weights: ema serves them)" if ema else ""
        return obj[common[0]], f"dict entry '{common[0]}'{also}"
    if len(candidates) == 1:
        return obj[candidates[0]], f"dict entry '{candidates[0]}'"
    if not candidates:
        raise CheckpointError(f"no state_dict found in checkpoint; its keys: {_key_list(obj)}")
    raise CheckpointError(
        f"checkpoint holds several state_dicts: {candidates}; set state_dict_key to choose one"
    )


def _key_list(obj: Mapping) -> list[str]:
    return [str(k) for k in list(obj)[:20]]


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """Remove 'module.' (DataParallel/DDP) and '_orig_mod.' (torch.compile) when every key has one."""
    own = list(own_keys)
    result = dict(state_dict)
    changed = True
    while changed and result:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result) and not any(k.startswith(prefix) for k in own):
                result = {k[len(prefix):]: v for k, v in result.items()}
                changed = True
    return result


def _summarize(title: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{len(items)} {title}: {', '.join(items[:SHOWN])}{more}"


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool,
                 prefix: str | None = None) -> tuple[tuple[str, ...], str]:
    """Copy weights into module; return the checkpoint keys skipped (only when not strict) and a note on
    the key prefix removed, if any.

    With `prefix`, only the keys under it are loaded, without it. Otherwise a dotted prefix every key
    shares is removed when that makes the keys exactly the module's (a Lightning `model.`), and
    wrapper prefixes ('module.', '_orig_mod.') when every key has one.

    Raises:
        CheckpointError: strict and the keys or shapes differ; names the first few of each.
    """
    own = module.state_dict()
    note = ""
    if prefix is not None:
        state_dict, others = training.strip_prefix(state_dict, prefix)
        note = f", prefix '{prefix}' stripped" + (f" ({others} other keys ignored)" if others else "")
    elif (found := training.fit_prefix(list(state_dict), own.keys())) is not None:
        state_dict = {k[len(found):]: v for k, v in state_dict.items()}
        note = f", prefix '{found}' stripped"
        log.info("every checkpoint key starts with '%s' and the rest fit the architecture: stripped it", found)
    else:
        state_dict = strip_wrapper_prefixes(state_dict, own.keys())
    mismatched = [
        f"{k} (checkpoint {list(v.shape)}, model {list(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    fitting = {k: v for k, v in state_dict.items() if not (k in own and v.shape != own[k].shape)}
    result = module.load_state_dict(fitting, strict=False)
    problems = [
        _summarize(title, items)
        for title, items in (
            ("missing keys", list(result.missing_keys)),
            ("unexpected keys", list(result.unexpected_keys)),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if strict and problems:
        hint = training.prefix_hint(list(state_dict), own.keys()) if prefix is None else ""
        raise CheckpointError("checkpoint does not fit the architecture: " + "; ".join(problems) + hint)
    if problems:
        log.warning("non-strict load skipped: %s", "; ".join(problems))
    skipped = list(result.unexpected_keys) + [m.split(" ")[0] for m in mismatched]
    return tuple(skipped), note
