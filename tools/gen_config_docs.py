"""Write docs/configuration.md from the config models' fields (serve/config.py and each task's Options).

    python tools/gen_config_docs.py           # writes docs/configuration.md
    python tools/gen_config_docs.py --check   # exits 1 if docs/configuration.md is not what this writes

The models are found by walking ServeConfig's fields' annotations (so a model moved to another module,
such as PreprocessSpec, is still found), plus serve.tasks.TASKS' Options (the mapping named after a
model's task). Each field's name, type, constraints and default come from pydantic; its description
from Field(description=...); its environment variable from serve.config.SERVER_ENV (and MODEL_ENV
below). Only the introduction and the descriptions serve/config.py doesn't carry yet are written here.
"""
from __future__ import annotations

import argparse
import enum
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT))

import annotated_types  # noqa: E402  (pydantic's dependency)
from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

import serve.config as config  # noqa: E402
from serve.tasks import TASKS  # noqa: E402

# Environment variables that set a field of every model entry (serve/config.py's _resolve_model reads
# them; checked below to still be there).
MODEL_ENV = {"SERVE_DEVICE": "device", "SERVE_RUNTIME": "runtime"}

# Fields that are not configuration: set by the loader, never by the YAML.
INTERNAL = {("ServeConfig", "source"), ("ModelSpec", "task_options")}

# Descriptions for fields whose Field() has none yet. A Field(description=...) in serve/config.py wins
# over the text here (the generator then says so on stderr: delete the entry). Move these into
# serve/config.py when it is next edited; they are the old README table's words.
FALLBACK = {
    "ModelSpec.name": "URL-safe name: lower-case letters, digits, `_ . -` (`/predictions/<name>`)",
    "ModelSpec.architecture": (
        "`package.module:Name`, `package.module:Class.factory`, a `torchvision.models` builder name (built with "
        "`weights=None`), or `timm:<model name>` (`timm.create_model(name, pretrained=False, **kwargs)`; nothing "
        "is downloaded). Required for a state_dict; not for a trusted whole-model pickle, a model folder, "
        "TorchScript, a torch.export program, an ONNX file or a TorchServe archive"),
    "ModelSpec.kwargs": "keyword arguments for the architecture callable",
    "ModelSpec.checkpoint": (
        "`.pth`/`.pt`/`.tar`/`.ckpt`/`.safetensors`, a TorchScript file, a torch.export program (`.pt2`), an "
        "`.onnx` file, a TorchServe archive (`.mar`), or a timm / Hugging Face model folder (`config.json` + "
        "`model.safetensors` or `pytorch_model.bin`, which then supplies `architecture`, `kwargs`, `labels` and "
        "`preprocess`); relative to the config file, or `package://pkg/path/in/pkg`. May be left out when "
        "`versions` lists the checkpoints (see [checkpoints.md](checkpoints.md))"),
    "ModelSpec.state_dict_key": (
        "which entry holds the weights; `null` detects: a bare state_dict; else the one tensor dict under a "
        "conventional key (`state_dict`, `model_state_dict`, `model`, `net`, `network`, `weights`); else the only "
        "tensor dict; anything ambiguous is an error that lists the candidates"),
    "ModelSpec.strict": "`false` loads what fits (warm start) and logs the skipped, missing and mis-shaped keys",
    "ModelSpec.trust_pickle": (
        "allow a whole-model pickle (`torch.save(model)`) for this model only; it can run code, so it logs a "
        "warning"),
    "ModelSpec.device": "`cpu`, `cuda`, `cuda:N`, or `auto` (first GPU, else CPU); a missing GPU stops start-up",
    "ModelSpec.labels": (
        "a text file (one per line), an inline list, or `torchvision:<Weights enum>.<member>`; must match the "
        "class count"),
    "ModelSpec.topk": "default number of classes answered (`?topk=N` overrides)",
    "ModelSpec.preprocess": "how an upload becomes the model's input: see [`preprocess`](#preprocess)",
    "ModelSpec.sha256": "expected checkpoint digest, verified before loading",
    "ModelSpec.runtime": (
        "what runs the forward: `auto` (ONNX Runtime where its export answers as eager does, else eager with "
        "the reason), `eager`, `onnxruntime` (fails start-up instead of falling back); see "
        "[operations.md](operations.md#runtimes-eager-pytorch-and-onnx-runtime)"),
    "PreprocessSpec.mean": "per-channel mean, 0–1 scale (one value per channel of `mode`)",
    "PreprocessSpec.std": "per-channel standard deviation, 0–1 scale, positive",
    "PreprocessSpec.mode": "`RGB` (3 channels) or `L` (grey, 1 channel)",
    "PreprocessSpec.interpolation": "the resampling filter of the resize",
    "VersionSpec.version": "the version's name: `/predictions/<name>/<version>`",
    "VersionSpec.checkpoint": "this version's checkpoint, relative to the config file",
    "VersionSpec.sha256": "its expected digest, verified before loading",
    "VersionSpec.state_dict_key": "this version's weights entry; `null`: the model's",
    "VersionSpec.weights": "`default` or `ema` for this version; `null`: the model's",
    "VersionSpec.strip_prefix": "this version's key prefix; `null`: the model's",
    "VersionSpec.labels": "this version's labels; `null`: the model's",
    "ServerSettings.max_upload_bytes": "request body limit (413 above)",
    "ServerSettings.max_image_pixels": (
        "decoded pixels per image (413 above, checked from the header before decoding), and per worker at once"),
    "ServerSettings.max_images_per_request": "files in one multipart request (413 above)",
    "ServerSettings.request_timeout_s": "a request not answered by then (all its images) gets 503 `timeout`",
    "ServerSettings.host": "bind address (the container sets `0.0.0.0`)",
    "ServerSettings.port": "bind port",
    "ServerSettings.timeout_s": "gunicorn worker timeout",
    "ServerSettings.graceful_timeout_s": "time to finish in-flight requests on SIGTERM",
    "ServerSettings.preload": (
        "load models in the gunicorn master before forking; `null` (auto): on unless a model uses CUDA"),
    "ServerSettings.log_level": "the server's log level",
    "ServerSettings.tls_min_version": "the oldest TLS version accepted",
}

INTRO = """\
# Configuration reference

<!-- Generated by tools/gen_config_docs.py from serve/config.py and serve/tasks/; do not edit by hand.
     Edit a field's Field(description=...) or the script's introduction, then run
     `~/.cache/serve-venv/bin/python tools/gen_config_docs.py`. tests/test_docs.py fails when this is stale. -->

The server reads one YAML file: `models/models.yaml` by default, or the file `SERVE_CONFIG` names. It holds
a `models:` list (one entry per model; at least one) and an optional `server:` mapping:

```yaml
models:
  - name: my_net                        # URL-safe: /predictions/my_net
    architecture: models.my_net:MyNet   # package.module:Name, package.module:Class.factory, or a torchvision name (resnet18)
    kwargs: {num_classes: 10}           # passed to the architecture callable
    checkpoint: ../checkpoints/best.tar # relative to this file; package://pkg/path for a file inside an installed package
    state_dict_key: null                # null = detect; e.g. modelA_state_dict for a multi-model file
    labels: labels.txt                  # one per line; or an inline list; or torchvision:ResNet18_Weights.IMAGENET1K_V1
    preprocess: {resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], mode: RGB}
    task: classify                      # the task's own fields go in a mapping named after it, e.g. classify: {spatial_average: true}
server:
  max_queue_wait_ms: 250
  log_format: json
```

- **The environment wins** over the `server:` section: each server field with an environment variable
  below can be set either way (`SERVE_ONNX_CACHE_DIR=off`, `WEB_CONCURRENCY=4`). `SERVE_DEVICE` and
  `SERVE_RUNTIME` override `device` and `runtime` of every model entry.
- **Paths** set in the YAML (checkpoints, labels, versions' checkpoints, the server's files) are relative to
  the config file; set in the environment, to the working directory.
- `onnx_cache_dir` left unset is `$XDG_CACHE_HOME/torch-serve/onnx`, else `~/.cache/torch-serve/onnx`;
  `off` keeps no cache (the export runs at every start).
- `workers` unset is one per core when the models are preloaded (the CPU default), otherwise one per visible
  GPU, at least 1. `state_dir` unset is a new directory under `/dev/shm` (else the temp dir), removed at exit.
- `enable_management: true` serves the whole management API: load, set-default, unload and reload model
  versions in every worker ([operations.md](operations.md#rolling-out-a-version-and-rolling-back)); a
  `state_dir` that outlives the server keeps those changes across restarts.
- `api_keys` (`SERVE_API_KEYS`, the keys document as JSON or YAML text) and `api_keys_file` exclude each
  other; `tls_cert_file` and `tls_key_file` go together, and `tls_ca_file` needs them.
- **A bad config stops the server** with a message naming the model and the field, e.g.
  `invalid config: model 'tiny': field 'topk': Input should be greater than 0 (got 0)`. A model's output
  must also fit its task, or start-up stops naming the model, the task and the shape.
- `python -m serve check [CONFIG]` loads and warms up every model and reports; `python -m serve inspect
  CHECKPOINT --config` writes an entry for a checkpoint (see [checkpoints.md](checkpoints.md)).

What the fields mean in use: checkpoints and their formats in [checkpoints.md](checkpoints.md), tasks in
[tasks.md](tasks.md), versions, admission and the management API in [operations.md](operations.md),
keys and TLS in [security.md](security.md).
"""

SECTIONS_NOTE = {
    "server": "The `server:` mapping: limits and process settings shared by every model.",
    "models": "Each entry of the `models:` list.",
    "preprocess": "A model entry's `preprocess:` mapping: how an uploaded image becomes the model's input tensor. "
                  "A timm model folder fills in what the entry leaves out.",
    "versions": "Each entry of a model's `versions:` list: its own checkpoint, and the fields that may differ "
                "between versions; the model's other fields are shared.",
}


def _escape(text: str) -> str:
    """A Field description (plain text) as a Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    """Hand-written Markdown as a table cell."""
    return text.replace("|", "\\|")


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    return str(value)


def _type(annotation: Any, anchors: dict[type, str]) -> str:
    if annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{_yaml(v)}`" for v in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a, anchors) for a in get_args(annotation))
    if origin in (tuple, list):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return "list of " + (_type(args[0], anchors) if args else "values")
    if origin is dict:
        return "mapping"
    if inspect.isclass(annotation):
        if issubclass(annotation, BaseModel):
            name = anchors.get(annotation, annotation.__name__)
            return f"[mapping](#{name})"
        if issubclass(annotation, SecretStr):
            return "string (secret)"
        if issubclass(annotation, Path):
            return "path"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    if annotation is Any:
        return "any"
    return str(annotation)


def _constraints(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {_yaml(getattr(item, attr))}")
        if isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(info: FieldInfo, anchors: dict[type, str]) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return f"see [below](#{anchors.get(type(value), type(value).__name__)})"
    return f"`{_yaml(value)}`"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (inside unions, tuples, lists)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def discover() -> list[tuple[str, type[BaseModel], str]]:
    """(anchor, model, YAML path) for every config model, in reading order: server, models, their parts."""
    found: list[tuple[str, type[BaseModel], str]] = []
    seen: set[type] = set()

    def walk(model: type[BaseModel], anchor: str, path: str) -> None:
        if model in seen:
            return
        seen.add(model)
        found.append((anchor, model, path))
        for name, info in model.model_fields.items():
            for inner in _models_in(info.annotation):
                many = get_origin(info.annotation) in (tuple, list)
                walk(inner, name, f"{path}.{name}[]" if many else f"{path}.{name}")

    top = config.ServeConfig.model_fields
    # server before models: it is what an operator reads first; then each model entry and its parts.
    for name in sorted(top, key=lambda n: n != "server"):
        if (config.ServeConfig.__name__, name) in INTERNAL:
            continue
        for inner in _models_in(top[name].annotation):
            many = get_origin(top[name].annotation) in (tuple, list)
            walk(inner, name, f"{name}[]" if many else name)
    return found


def _env_of(model: type[BaseModel]) -> dict[str, list[str]]:
    env: dict[str, list[str]] = {}
    if model is config.ServerSettings:
        for var, field in config.SERVER_ENV.items():
            env.setdefault(field, []).append(var)
    if model is config.ModelSpec:
        for var, field in MODEL_ENV.items():
            env.setdefault(field, []).append(var)
    return env


def _table(model: type[BaseModel], prefix: str, anchors: dict[type, str], used: set[str]) -> list[str]:
    env = _env_of(model)
    with_env = bool(env)
    head = "| field | type | default | " + ("environment | " if with_env else "") + "description |"
    rule = "|---|---|---|" + ("---|" if with_env else "") + "---|"
    rows = [head, rule]
    for name, info in model.model_fields.items():
        if (model.__name__, name) in INTERNAL:
            continue
        key = f"{model.__name__}.{name}"
        if info.description:
            text = _escape(info.description)
            if key in FALLBACK:
                print(f"note: {key} now has a Field description; delete its FALLBACK entry", file=sys.stderr)
        elif key in FALLBACK:
            text = _cell(FALLBACK[key])
            used.add(key)
        else:
            text = ""
            print(f"note: {key} has no description (add Field(description=...) in its model)", file=sys.stderr)
        kind = _type(info.annotation, anchors)
        limits = _constraints(info)
        if limits:
            kind += ", " + _cell(limits)
        cells = [f"`{prefix}{name}`", kind, _default(info, anchors)]
        if with_env:
            cells.append(", ".join(f"`{v}`" for v in env.get(name, [])) or "—")
        cells.append(text)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render() -> str:
    source = inspect.getsource(config)
    for var in MODEL_ENV:
        if f'"{var}"' not in source:
            raise SystemExit(f"gen_config_docs: {var} is no longer read by serve/config.py: update MODEL_ENV")
    found = discover()
    anchors = {model: anchor for anchor, model, _ in found}
    used: set[str] = set()
    out = [INTRO]
    for anchor, model, path in found:
        out.append(f'<a id="{anchor}"></a>\n')
        out.append(f"## `{path}`\n")
        doc = SECTIONS_NOTE.get(anchor) or (inspect.getdoc(model) or "").strip()
        if doc:
            out.append(doc + "\n")
        prefix = "" if anchor in ("server", "models") else f"{anchor}."
        out.append("\n".join(_table(model, prefix, anchors, used)) + "\n")
    out.append('<a id="tasks"></a>\n')
    out.append("## Task options: `models[].<task>`\n")
    out.append("A model entry's task (`task:`) takes its own fields in a mapping named after it, e.g. "
               "`task: detect` with `detect: {score_threshold: 0.3}`; a mapping for another task is an error. "
               "See [tasks.md](tasks.md).\n")
    for name, task in TASKS.items():
        out.append(f'<a id="task-{name}"></a>\n')
        out.append(f"### `{name}`\n")
        if not task.Options.model_fields:
            out.append("No options.\n")
            continue
        out.append("\n".join(_table(task.Options, f"{name}.", anchors, used)) + "\n")
    out.append("## Environment variables\n")
    rows = ["| variable | sets |", "|---|---|",
            "| `SERVE_CONFIG` | the config file (default `models/models.yaml`) |"]
    for var, field in MODEL_ENV.items():
        rows.append(f"| `{var}` | [`{field}`](#models) of every model entry |")
    for var, field in sorted(config.SERVER_ENV.items()):
        rows.append(f"| `{var}` | [`server.{field}`](#server) |")
    rows.append("| `XDG_CACHE_HOME` | where the default `onnx_cache_dir` lies |")
    out.append("\n".join(rows) + "\n")
    unused = sorted(set(FALLBACK) - used)
    for key in unused:
        model, _, field = key.partition(".")
        if not any(m.__name__ == model and field in m.model_fields for _, m, _ in found):
            print(f"note: FALLBACK entry {key} names no field", file=sys.stderr)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is stale: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
