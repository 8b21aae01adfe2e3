"""TorchServe model archives (.mar, made by torch-model-archiver): the manifest's handler names the
task, the serialized file holds the model, index_to_name.json the labels.

The archive is read in place: members are read by name, and the serialized file (and a trusted
modelFile) are copied into a private temporary folder that is removed once loaded; nothing is ever
extracted over anything. No handler is ever imported: a built-in image handler is replaced by this
server's own task and the preprocessing TorchServe applies for it (ts/torch_handler/*.py, 0.12), and
an archive with a custom handler is refused. A modelFile (the class of an eager state_dict) is
imported only with `trust_code: true`, after its weights passed the weights-only read.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serve.config import ModelSpec
from serve.errors import CheckpointError, ConfigError, ExportError
from serve.formats import exported, safe_globals, torchscript
from serve.formats.opened import Implied, Opened
from serve.formats.state_dict import build_module, error_line, find_state_dict, load_weights, read_checkpoint
from serve.runtimes.onnx import open_onnx_bytes
from serve.tasks import TASKS

log = logging.getLogger(__name__)

MANIFEST = "MAR-INF/MANIFEST.json"
LABELS_FILE = "index_to_name.json"
IMAGENET = {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "mode": "RGB", "interpolation": "bilinear"}
# TorchServe's built-in image handlers and the preprocessing each applies; the task that stands for
# each one says so itself (Task.torchserve_handler).
HANDLERS = {
    "image_classifier": IMAGENET,  # Resize(256), CenterCrop(224), ToTensor, Normalize
    "image_segmenter": IMAGENET,  # the same transforms
    "object_detector": {},  # ToTensor only: what the detect task feeds (0-1, any size)
}


def task_for(handler: str) -> str:
    return next(name for name, task in TASKS.items() if task.torchserve_handler == handler)


@dataclass(frozen=True)
class Manifest:
    """MAR-INF/MANIFEST.json's model entry, and the archive's member names."""

    model_name: str
    handler: str
    serialized_file: str | None
    model_file: str | None
    archiver_version: str
    members: tuple[str, ...]

    @property
    def builtin(self) -> str | None:
        """The built-in image handler named, unless the archive ships a file of that name (then it
        is the archive's own code, as TorchServe would import it)."""
        name, _, function = self.handler.partition(":")
        if name in HANDLERS and function in ("", "handle") and f"{name}.py" not in self.members:
            return name
        return None


def matches(names: list[str]) -> bool:
    return MANIFEST in names


def read_manifest(archive: zipfile.ZipFile, where: str) -> Manifest:
    """Raises: CheckpointError: the manifest is missing, not JSON, or has no model handler."""
    try:
        data = json.loads(archive.read(MANIFEST))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"TorchServe archive {where}: {MANIFEST} is unreadable: {error_line(exc)}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("handler"), str):
        raise CheckpointError(f"TorchServe archive {where}: {MANIFEST} has no model.handler")
    fields = {key: model.get(key) if isinstance(model.get(key), str) else None
              for key in ("serializedFile", "modelFile")}
    return Manifest(str(model.get("modelName", "?")), model["handler"], fields["serializedFile"] or None,
                    fields["modelFile"] or None, str(data.get("archiverVersion", "?")), tuple(archive.namelist()))


def handler_task(manifest: Manifest, spec: ModelSpec) -> str:
    """The task the archive's built-in handler stands for.

    Raises:
        CheckpointError: a custom handler (never imported), or a built-in one that isn't an image task.
    """
    where = f"model '{spec.name}': archive {spec.checkpoint.name}"
    if manifest.builtin is not None:
        return task_for(manifest.builtin)
    serialized = manifest.serialized_file or "(none)"
    how = (f"To serve its weights, take the serialized file '{serialized}' out of the archive "
           f"(unzip {spec.checkpoint.name} {serialized}) and point checkpoint: at it: a TorchScript file "
           f"needs nothing more, a state_dict needs architecture: (the class in its modelFile); set "
           f"preprocess: and labels: as the handler did")
    name = manifest.handler.partition(":")[0]
    if name.removesuffix(".py") in ("text_classifier", "text_handler", "base_handler", "vision_handler", "densenet_handler"):
        raise CheckpointError(f"{where} uses TorchServe's handler '{manifest.handler}', which is not one of "
                              f"the image tasks served here ({', '.join(HANDLERS)}). {how}")
    raise CheckpointError(
        f"{where} uses the custom handler '{manifest.handler}': its Python code would decide preprocessing "
        f"and inference, and this server never imports an archive's handler. {how}"
    )


def read_labels(archive: zipfile.ZipFile, manifest: Manifest, where: str) -> tuple[str, ...] | None:
    """index_to_name.json as labels in index order: {"0": "name"} or {"0": [..., "name"]} (TorchServe's
    rule: the last element), or {"object_type_names": [...]}.

    Raises:
        CheckpointError: the file is not such a mapping, or its indices are not 0..N-1.
    """
    if LABELS_FILE not in manifest.members:
        return None
    bad = f"archive {where}: {LABELS_FILE}"
    try:
        mapping = json.loads(archive.read(LABELS_FILE))
    except ValueError as exc:
        raise CheckpointError(f"{bad} is not JSON ({error_line(exc)}); set labels: to override it") from None
    if isinstance(mapping, dict) and isinstance(mapping.get("object_type_names"), list):
        mapping = {str(i): name for i, name in enumerate(mapping["object_type_names"])}
    if not isinstance(mapping, dict):
        raise CheckpointError(f"{bad} must map indices to names; set labels: to override it")
    labels: dict[int, str] = {}
    for key, value in mapping.items():
        name = value[-1] if isinstance(value, list) and value else value
        if not (isinstance(key, str) and key.isdigit() and isinstance(name, str)):
            raise CheckpointError(f"{bad}: entry {key!r}: {value!r} is not \"index\": name or [..., name]; "
                                  f"set labels: to override it")
        labels[int(key)] = name
    missing = sorted(set(range(len(labels))) - set(labels))
    if missing:
        raise CheckpointError(f"{bad}: indices must run 0..{len(labels) - 1}, missing {missing[:5]}; "
                              f"set labels: to override it")
    return tuple(labels[i] for i in range(len(labels)))


def serialized_kind(archive: zipfile.ZipFile, member: str) -> str:
    """What the serialized file is, from its bytes (and .onnx from its name): never unpickled here."""
    if member.endswith(".onnx"):
        return "ONNX"
    with archive.open(member) as f:
        head = f.read(8)
        if head[:2] == b"PK":
            f.seek(0)
            with zipfile.ZipFile(f) as inner:
                names = inner.namelist()
            if torchscript.matches(names):
                return "TorchScript"
            return "torch.export program" if exported.matches(names) else "torch.save zip"
    if member.endswith(".safetensors"):
        return "safetensors"
    return "pickle (legacy torch.save or pickle.dump)"


def open_model(spec: ModelSpec, device: torch.device) -> Opened:
    """Read the archive's model as its manifest describes it.

    Raises:
        CheckpointError: custom handler, missing member, unsupported serialized file, refused pickle,
            or a modelFile without trust_code.
        ConfigError: the config doesn't fit the archive (see torchscript.refuse_architecture).
    """
    where = f"model '{spec.name}': archive {spec.checkpoint.name}"
    with zipfile.ZipFile(spec.checkpoint) as archive:
        manifest = read_manifest(archive, spec.checkpoint.name)
        task = handler_task(manifest, spec)
        member = manifest.serialized_file
        if member is None or member not in manifest.members:
            raise CheckpointError(f"{where}: its manifest names the serialized file {member!r}, which is not in it")
        labels = None if "labels" in spec.model_fields_set else read_labels(archive, manifest, spec.checkpoint.name)
        kind = serialized_kind(archive, member)
        if kind == "ONNX":  # served by ONNX Runtime from memory: no file of the archive is written anywhere
            torchscript.refuse_architecture(spec, "TorchServe archive holding an ONNX model")
            try:
                runtime = open_onnx_bytes(archive.read(member), f"{spec.checkpoint.name}:{member}", device)
            except ExportError as exc:
                raise CheckpointError(f"{where}: {exc.message}") from None
            implied = Implied(task, labels, dict(HANDLERS[manifest.builtin]))
            return Opened(None, f"TorchServe archive ({manifest.builtin}), ONNX {member}", implied, runtime=runtime)
        if kind == "torch.export program":
            raise CheckpointError(f"{where}: its serialized file '{member}' is a torch.export program; take it out "
                                  f"of the archive and point checkpoint: at it (with trust_code: true)")
        with tempfile.TemporaryDirectory(prefix="serve-mar-") as private:  # mode 0700, removed on exit
            weights = _copy_member(archive, member, Path(private) / f"serialized{_suffix(member)}")
            if kind == "TorchScript":
                torchscript.refuse_architecture(spec, "TorchServe archive holding a TorchScript file")
                module = torchscript.read(weights, device, f"{spec.checkpoint.name}:{member}")
                opened = (module, f"TorchServe archive ({manifest.builtin}), TorchScript {member}", ())
            else:
                opened = _open_eager(spec, archive, manifest, weights, Path(private), device)
    module, layout, skipped = opened
    implied = Implied(task, labels, dict(HANDLERS[manifest.builtin]))
    return Opened(module, layout, implied, skipped)


def _open_eager(spec: ModelSpec, archive: zipfile.ZipFile, manifest: Manifest, weights: Path, private: Path,
                device: torch.device) -> tuple[nn.Module, str, tuple[str, ...]]:
    """A state_dict for the config's architecture, or else the one class the modelFile defines. The
    weights are read first (weights-only, so a pickle is refused before any archive code could run)."""
    member = manifest.serialized_file
    allowed = safe_globals.resolve_safe_globals(spec.safe_globals, spec.name)
    obj = read_checkpoint(weights, device, trust_pickle=spec.trust_pickle, allowed=allowed)
    state, _ = find_state_dict(obj, spec.state_dict_key, spec.weights)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if spec.architecture is not None:
        module = build_module(spec.architecture, spec.kwargs, spec.name)
        source = spec.architecture
    elif manifest.model_file is not None:
        module = _build_from_model_file(spec, archive, manifest, private)
        source = f"{manifest.model_file}:{type(module).__name__}"
    else:
        raise ConfigError(
            f"model '{spec.name}': field 'architecture': archive {spec.checkpoint.name}'s serialized file "
            f"'{member}' is a state_dict and the archive has no modelFile; give the architecture it fits"
        )
    skipped, note = load_weights(module, state, spec.strict, spec.strip_prefix)
    return module, f"TorchServe archive ({manifest.builtin}), state_dict {member} for {source}{note}", skipped


def _build_from_model_file(spec: ModelSpec, archive: zipfile.ZipFile, manifest: Manifest, private: Path) -> nn.Module:
    """TorchServe's rule: import the modelFile, take the one nn.Module subclass it defines (not one it
    imports), call it with no arguments.

    Raises:
        CheckpointError: no consent, the file is missing or fails, or it defines not exactly one class.
    """
    where = f"model '{spec.name}': archive {spec.checkpoint.name}"
    model_file = manifest.model_file
    if not spec.trust_code:
        defined = ", ".join(defined_classes(archive, model_file)) or "no class"
        raise CheckpointError(
            f"{where}: its weights are a state_dict for the class in its modelFile '{model_file}' ({defined}); "
            f"building it means importing that file, which runs the archive's Python code, so it is refused. "
            f"Set trust_code: true for this model if you trust the archive, or give architecture: (and kwargs:) "
            f"for that class yourself, so the archive only provides weights"
        )
    if model_file not in manifest.members:
        raise CheckpointError(f"{where}: its modelFile '{model_file}' is not in it")
    path = _copy_member(archive, model_file, private / Path(model_file).name)
    name = "serve_mar_" + re.sub(r"\W", "_", f"{spec.name}_{Path(model_file).stem}")
    log.warning("%s: importing its modelFile %s because trust_code is set: it runs the archive's code", where, model_file)
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # as an import does: dataclasses and pickling look classes up there
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the archive's own code: any failure means the model can't be built
        sys.modules.pop(name, None)
        raise CheckpointError(f"{where}: importing its modelFile '{model_file}' failed: {error_line(exc)}") from None
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == name]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise CheckpointError(f"{where}: its modelFile '{model_file}' must define exactly one nn.Module class "
                              f"(TorchServe's rule), found {found}; give architecture: instead")
    try:
        return classes[0]()
    except Exception as exc:  # the archive's constructor
        raise CheckpointError(f"{where}: {classes[0].__name__}() from '{model_file}' failed: {error_line(exc)}") from None


def defined_classes(archive: zipfile.ZipFile, model_file: str) -> list[str]:
    """The classes a Python file defines at its top level, read by parsing it (nothing runs)."""
    try:
        tree = ast.parse(archive.read(model_file))
    except (KeyError, SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.ClassDef)]


def _copy_member(archive: zipfile.ZipFile, member: str, target: Path) -> Path:
    with archive.open(member) as source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return target


def _suffix(member: str) -> str:
    suffix = Path(member).suffix
    return suffix if re.fullmatch(r"\.\w{1,16}", suffix) else ""


def describe(path: Path) -> list[tuple[str, str]]:
    """The manifest, the handler's verdict, the model file's classes and the serialized file's
    format, read without importing or unpickling anything.

    Raises:
        CheckpointError: the manifest is unreadable.
    """
    with zipfile.ZipFile(path) as archive:
        manifest = read_manifest(archive, path.name)
        if manifest.builtin is not None:
            task, preprocess = task_for(manifest.builtin), HANDLERS[manifest.builtin]
            handler = f"{manifest.handler} (built-in)"
            verdict = [("task", task), ("preprocess", _brief(preprocess))]
        else:
            handler = f"{manifest.handler} (custom: never imported here)"
            verdict = [("task", "none: an archive with a custom handler is refused")]
        lines = [("model", f"{manifest.model_name} (torch-model-archiver {manifest.archiver_version})"),
                 ("handler", handler), *verdict]
        if manifest.model_file:
            classes = ", ".join(defined_classes(archive, manifest.model_file)) or "none found"
            lines.append(("model file", f"{manifest.model_file} (classes defined: {classes}; importing it "
                                        f"needs trust_code: true, or give architecture:)"))
        member = manifest.serialized_file
        if member and member in manifest.members:
            size = archive.getinfo(member).file_size
            lines.append(("serialized", f"{member} ({size} bytes, {serialized_kind(archive, member)})"))
        else:
            lines.append(("serialized", f"{member!r}: not in the archive"))
        try:
            labels = read_labels(archive, manifest, path.name)
            lines.append(("labels", f"{len(labels)} from {LABELS_FILE}" if labels else "none"))
        except CheckpointError as exc:
            lines.append(("labels", exc.message))
        lines.append(("members", ", ".join(manifest.members)))
    return lines


def _brief(preprocess: dict) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in preprocess.items())
