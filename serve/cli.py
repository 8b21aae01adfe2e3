"""Command line: inspect a checkpoint, check a config, predict an image without the HTTP server."""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from serve.config import load_config
from serve.errors import CheckpointError, InvalidRequestError, ServeError
from serve.extras import require
from serve.formats.entry import suggest_entry
from serve.formats.packaged import describe
from serve.formats.safe_globals import resolve_safe_globals
from serve.formats.timm_folder import is_model_folder
from serve.formats.training import ema_entry
from serve.loader import file_sha256, find_state_dict, is_state_dict, read_checkpoint, weights_path
from serve.service import Call, Inputs, PredictionService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print a checkpoint's layout and every key with its shape")
    inspect.add_argument("checkpoint", type=Path)
    inspect.add_argument("--key", help="the state_dict_key to use, as in the config")
    inspect.add_argument("--trust-pickle", action="store_true", help="allow a whole-model pickle (runs its code)")
    inspect.add_argument("--safe-global", action="append", default=[], metavar="MODULE:CLASS",
                         help="a class the file may hold besides tensors, as the config's safe_globals")
    inspect.add_argument("--config", action="store_true", help="print a models.yaml entry for the file instead")
    check = commands.add_parser("check", help="load and warm up every model of a config, then report")
    check.add_argument("config", nargs="?", type=Path, help="default: SERVE_CONFIG or models/models.yaml")
    predict = commands.add_parser("predict", help="print a model's answer for an image (its task's JSON)")
    predict.add_argument("image", type=Path)
    predict.add_argument("--model", help="model name (default: the config's first)")
    predict.add_argument("--config", type=Path)
    predict.add_argument("--topk", type=int, help="classify: number of classes")
    predict.add_argument("--threshold", type=float, help="detect: the lowest score answered")
    predict.add_argument("--format", choices=["json", "torchserve", "png"],
                         help="default: the model's response_format; png (segment) writes the mask to --output")
    predict.add_argument("--output", type=Path, help="with --format png: the file to write")
    args = parser.parse_args(argv)
    try:
        return {"inspect": run_inspect, "check": run_check, "predict": run_predict}[args.command](args)
    except ServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def run_inspect(args: argparse.Namespace) -> int:
    folder: Path = args.checkpoint.resolve()
    if folder.suffix.lower() == ".onnx":
        return _inspect_onnx(folder, args.config)
    described = describe(folder) if folder.is_file() else None  # a packaged model: none of its code runs
    if described is not None and args.config:
        print("\n".join(packaged_entry(folder, dict(described))))
        return 0
    if described is not None:
        lines = [("file", f"{folder} ({folder.stat().st_size} bytes)"), ("sha256", file_sha256(folder)), *described]
        width = max(len(label) for label, _ in lines) + 2
        for label, text in lines:
            print(f"{label}:".ljust(width) + text)
        return 0
    path = weights_path(folder)
    fmt = (
        "safetensors" if path.suffix == ".safetensors"
        else "zip (torch.save, PyTorch >= 1.6)" if zipfile.is_zipfile(path)
        else "legacy (torch.save before 1.6, or _use_new_zipfile_serialization=False)"
    )
    allowed = resolve_safe_globals(args.safe_global, "inspect")
    obj = read_checkpoint(path, "cpu", trust_pickle=args.trust_pickle, allowed=allowed)
    if args.config:
        print("\n".join(suggest_entry(folder, obj, find_state_dict, tuple(args.safe_global))))
        return 0
    if is_model_folder(folder):
        print(f"folder:  {folder} (timm / Hugging Face model folder: config.json + {path.name})")
    print(f"file:    {path} ({path.stat().st_size} bytes)")
    print(f"sha256:  {file_sha256(path)}")
    print(f"format:  {fmt}")
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        print("entries: " + ", ".join(f"{k}={_brief(v)}" for k, v in obj.items()))
    try:
        weights, layout = find_state_dict(obj, args.key)
    except CheckpointError as exc:
        print(f"layout:  not decided: {exc.message}")
        for key, value in (obj.items() if isinstance(obj, Mapping) else ()):
            if is_state_dict(value):
                print(f"\n[{key}]")
                _print_tensors(value)
        return 0
    print(f"layout:  {layout}")
    if isinstance(obj, Mapping) and (ema := ema_entry(obj, is_state_dict)) and args.key is None:
        print(f"ema:     '{ema}' holds EMA weights (weights: ema serves them; --key {ema} lists them)")
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    print()
    _print_tensors(weights)
    return 0


def packaged_entry(path: Path, described: dict[str, str]) -> list[str]:
    """A models.yaml entry for a file that packages its model (inspect's lines about it): what the file
    settles is left out or filled in, what it can't is a <...> placeholder that fails check."""
    kind = described["format"]
    lines = [f"- name: {path.stem.lower().replace(' ', '_')}", f"  checkpoint: {path}"]
    if kind == "torch.export program":
        lines.append("  trust_code: true   # torch.export.load runs Python from the file: only for a file you trust")
    if kind == "TorchServe archive":
        if "custom" in described.get("handler", ""):
            return [f"# {path.name}: its handler is custom code, never imported; serve its weights instead "
                    f"(see python -m serve inspect {path.name})"]
        lines.append(f"  # task: {described.get('task')}, and TorchServe's preprocessing, come from the handler")
        serialized = described.get("serialized", "")
        if "model file" in described and not any(kind in serialized for kind in ("TorchScript", "ONNX")):
            lines.append("  trust_code: true   # imports the archive's model file; or give architecture: instead")
        if not described.get("labels", "none").startswith("none"):
            return lines  # labels from index_to_name.json
    lines.append("  labels: <labels.txt or a list: the model's class names>")
    if kind != "TorchServe archive":
        lines.append("  preprocess: <{resize, crop, mean, std} the model was trained with>")
    return lines


def _inspect_onnx(path: Path, as_config: bool) -> int:
    """An ONNX model's inputs, outputs, opset and external data files (read by onnx, nothing run)."""
    from serve.runtimes.onnx import open_onnx_file

    require("onnx", f"inspecting {path.name}", CheckpointError)
    import onnx

    try:
        open_onnx_file(path)  # the same checks as serving it: one input, external data inside its folder
    except ServeError as exc:
        raise CheckpointError(exc.message) from None
    model = onnx.load(str(path), load_external_data=False)
    if as_config:
        print(f"- name: {path.stem.lower().replace(' ', '_')}\n  checkpoint: {path}\n  runtime: onnxruntime\n"
              f"  labels: <labels.txt or a list: the model's class names>\n"
              f"  preprocess: <{{resize, crop, mean, std}} the model was trained with>")
        return 0

    def shape(value) -> str:
        dims = value.type.tensor_type.shape.dim
        return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

    initializers = {t.name for t in model.graph.initializer}
    external = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    print(f"file:     {path} ({path.stat().st_size} bytes)")
    print(f"sha256:   {file_sha256(path)}")
    print(f"format:   ONNX (opset {', '.join(str(o.version) for o in model.opset_import)}, producer {model.producer_name or '?'})")
    for value in model.graph.input:
        if value.name not in initializers:
            print(f"input:    {value.name} {shape(value)}")
    for value in model.graph.output:
        print(f"output:   {value.name} {shape(value)}")
    print(f"weights:  {len(model.graph.initializer)} tensors" + (f", external data in {external}" if external else ""))
    return 0


def _brief(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict({len(value)} entries, {tensors} tensors)"
    if isinstance(value, nn.Module):
        return f"module {type(value).__name__}"
    return repr(value)[:40]


def _print_tensors(state_dict: Mapping[str, torch.Tensor]) -> None:
    width = max(36, max(len(k) for k in state_dict) + 3)
    total = 0
    for key, tensor in state_dict.items():
        total += tensor.numel()
        print(key.ljust(width, "."), tensor.size(), str(tensor.dtype).removeprefix("torch."))
    print(f"{len(state_dict)} tensors, {total:,} values")


def run_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    service = PredictionService.load(config)
    for predictor in service.table.predictors.values():
        meta = predictor.metadata()
        print(
            f"{meta['name']}: ok, {predictor.task.summary()}, {meta['architecture']} on {meta['device']}, "
            f"runtime {_runtime_line(meta['runtime'])}, {meta['checkpoint']['layout']}, loaded in {meta['load_time_s']}s"
        )
    service.close()
    return 0


def _runtime_line(runtime: dict) -> str:
    """The runtime serving, with its export time and cache, or why it fell back to eager."""
    if runtime.get("fallback_reason"):
        return f"{runtime['name']} ({runtime['requested']} fell back: {runtime['fallback_reason']})"
    if runtime["name"] == runtime["requested"] or runtime.get("cache") is None:
        return runtime["name"]
    export = f"exported in {runtime['export_s']}s" if runtime.get("export_s") is not None else "no export"
    return f"{runtime['name']} ({export}, cache {runtime.get('cache')}, checked in {runtime.get('verify_s')}s)"


def run_predict(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name = args.model or config.models[0].name
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.format == "png" and args.output is None:
        raise InvalidRequestError("--format png needs --output FILE")
    given = {"topk": args.topk, "threshold": args.threshold}
    service = PredictionService.load(config, names=[name])
    try:
        answer = service.predict(Call(lambda _served: Inputs([data]), name,
                                      params={k: str(v) for k, v in given.items() if v is not None},
                                      answer_format=args.format))
    finally:
        service.close()
    if answer.answer_format == "png":
        if args.output is None:
            raise InvalidRequestError("--format png needs --output FILE")
        args.output.write_bytes(answer.png())
        print(f"wrote {args.output}")
    elif answer.answer_format == "torchserve":
        print(json.dumps(answer.torchserve(), indent=2))
    else:
        print(json.dumps(answer.results()[0].to_dict(), indent=2))
    return 0
