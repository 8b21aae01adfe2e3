"""Command line: serve (gunicorn), inspect a checkpoint, check a config, predict an image, batch over many."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from torch import nn

from serve.batch import (
    IMAGE_EXTENSIONS, BatchOutput, Shard, batch_config, collect_inputs, default_in_flight, select_shard,
)
from serve.batch import run_batch as batch_run
from serve.config import ServeConfig, build_config, load_config, load_server_settings
from serve.cores import available_cores
from serve.errors import CheckpointError, ConfigError, InvalidRequestError, ServeError
from serve.extras import require
from serve.formats.entry import suggest_entry
from serve.formats.packaged import describe
from serve.formats.safe_globals import resolve_safe_globals
from serve.formats.state_dict import find_state_dict, is_state_dict, read_checkpoint, weights_path
from serve.formats.timm_folder import is_model_folder
from serve.formats.training import ema_entry
from serve.sources.cache import file_sha256
from serve.runtimes.onnx import open_onnx_file
from serve.service import Call, Inputs, PredictionService
from serve.sources.address import is_remote
from serve.sources.resolver import Resolver
from serve.tasks import TASKS


def main(argv: list[str] | None = None, prog: str = "ckpt-serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    commands = {"serve": run_serve, "inspect": run_inspect, "check": run_check, "predict": run_predict,
                "batch": run_batch, "quantize": run_quantize}
    try:
        return commands[args.command](args)
    except ServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def build_parser(prog: str = "ckpt-serve") -> argparse.ArgumentParser:
    """The command line: one parser per subcommand, each --help with what it does and an example."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve PyTorch image models over HTTP, or run them on files.",
        epilog=f"examples:\n  {prog} serve --port 8000\n  {prog} batch photos/ --output answers.jsonl\n\n"
               f"{prog} COMMAND --help describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
        lines = "\n".join(f"  {prog} {name} {example}".rstrip() for example in examples)
        return commands.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                                   epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    serve = command(
        "serve", "start the HTTP server (gunicorn with the bundled settings)",
        "Start gunicorn with the bundled settings (serve/gunicorn_conf.py) serving every model of the config. "
        "The flags set the same settings as the environment variables SERVE_CONFIG, SERVE_HOST, PORT and "
        "WEB_CONCURRENCY; every other SERVE_* variable applies as well.",
        ["", "--config models.yaml --host 0.0.0.0 --port 8080 --workers 2"])
    serve.add_argument("--config", type=Path, help="the models.yaml (SERVE_CONFIG; default: the bundled one)")
    serve.add_argument("--host", help="the address to bind (SERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="the port (PORT; default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (WEB_CONCURRENCY; default: one per core, "
                       "one per GPU with CUDA models)")

    inspect = command(
        "inspect", "print a checkpoint's layout and every key with its shape",
        "Print what a checkpoint file (or model folder, .onnx, .mar, TorchScript, torch.export file) holds: "
        "its format, entries, the detected layout and every tensor; with --config, a models.yaml entry for it.",
        ["checkpoints/best.pth", "checkpoints/best.pth --config >> models.yaml"])
    inspect.add_argument("checkpoint", help="a file or model folder, or a remote source (s3://, hf://, https://)")
    inspect.add_argument("--sha256", help="a remote source's pinned digest (required for https://)")
    inspect.add_argument("--settings", type=Path, metavar="CONFIG",
                         help="the config whose server section fetches a remote source (allowed_sources, cache, "
                         "S3, Hub); default: SERVE_CONFIG or models/models.yaml, with SERVE_* overrides")
    inspect.add_argument("--key", help="the state_dict_key to use, as in the config")
    inspect.add_argument("--trust-pickle", action="store_true", help="allow a whole-model pickle (runs its code)")
    inspect.add_argument("--safe-global", action="append", default=[], metavar="MODULE:CLASS",
                         help="a class the file may hold besides tensors, as the config's safe_globals")
    inspect.add_argument("--config", action="store_true", help="print a models.yaml entry for the file instead")

    check = command(
        "check", "load and warm up every model of a config, then report",
        "Load and warm up every model of a config (choosing each one's runtime, as the server does) and print "
        "one line per model, or what is wrong; exits 1 on an error.",
        ["", "models.yaml"])
    check.add_argument("config", nargs="?", type=Path, help="default: SERVE_CONFIG or the bundled models.yaml")

    quantize = command(
        "quantize", "build a model's int8 copy into the cache and print its accuracy gate",
        "Quantise each model of a config (or --model) to int8 as precision: int8 does at start-up: calibrate "
        "on calibration.images (or the fallback photos), gate against fp32 on the held-out images, time both; "
        "write the int8 model into onnx_cache_dir, so servers with precision: int8 start from the cache. Prints "
        "the gate's figures; exits 1 where int8 fails its gate (fp32 would serve). See docs/precision.md.",
        ["", "--config models.yaml --model efficientnet_lite0"])
    quantize.add_argument("--config", type=Path, help="the models.yaml (default: SERVE_CONFIG or the bundled one)")
    quantize.add_argument("--model", help="one model's name (default: every model of the config)")

    predict = command(
        "predict", "print a model's answer for an image (its task's JSON)",
        "Load one model and print its answer for one image, as POST /predictions/<model> would.",
        ["cat.jpg", "street.jpg --config models.yaml --model deeplab --format png --output mask.png"])
    predict.add_argument("image", type=Path)
    predict.add_argument("--model", help="model name (default: the config's first)")
    predict.add_argument("--config", type=Path)
    _task_arguments(predict)
    predict.add_argument("--format", choices=["json", "torchserve", "png"],
                         help="default: the model's response_format; png (segment) writes the mask to --output")
    predict.add_argument("--output", type=Path, help="with --format png: the file to write")

    batch = command(
        "batch", "run a model over a folder, list file or glob of images, to JSON Lines or CSV",
        "Run one model over many images with the server's prediction core (batching, runtime), on every "
        "core: reading and decoding run beside the forward. Writes one record per image in input order "
        "(JSON Lines: path and answer or error; CSV for classify); an image that fails to decode is "
        "recorded and the run goes on. Segmentation masks go to PNG files in OUTPUT.masks/, embeddings "
        "also to OUTPUT's .npy (row i = line i). A killed run continues with --resume. See docs/batch.md.",
        ["photos/ --output answers.jsonl",
         "'shots/**/*.png' --checkpoint resnet18.pth --architecture resnet18 --output top1.csv --topk 1",
         "list.txt --config models.yaml --model deeplab --output masks.jsonl --shard 0/4 --resume"])
    batch.add_argument("inputs", metavar="INPUT", help="a folder (recursive), a list file (one path a line) or a "
                       "quoted glob pattern (** recursive)")
    batch.add_argument("--output", "-o", type=Path, required=True, help="the JSON Lines or CSV file to write")
    batch.add_argument("--format", choices=["jsonl", "csv"],
                       help="default: csv for an OUTPUT ending in .csv, else jsonl")
    source = batch.add_argument_group("the model: one from a config, or a checkpoint file")
    source.add_argument("--config", type=Path, help="the models.yaml (default: SERVE_CONFIG or the bundled one)")
    source.add_argument("--model", help="its name in the config (default: the config's first)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint, served with the entry inspect --config "
                        "suggests: what the file can't say comes from the flags below")
    source.add_argument("--architecture", help="with --checkpoint: package.module:Class, a torchvision name, "
                        "or timm:<name>")
    source.add_argument("--kwargs", type=json.loads, metavar="JSON", help="with --checkpoint: the architecture's "
                        "arguments, e.g. '{\"num_classes\": 10}'")
    source.add_argument("--labels", help="with --checkpoint: a labels file, one class name a line")
    source.add_argument("--task", choices=list(TASKS),
                        help="with --checkpoint: default classify")
    _task_arguments(batch)
    batch.add_argument("--ext", default=",".join(e.lstrip(".") for e in IMAGE_EXTENSIONS),
                       help="with a folder: the file extensions taken (default: %(default)s)")
    batch.add_argument("--shard", default="0/1", metavar="INDEX/COUNT",
                       help="take the sorted inputs whose position i has i %% COUNT == INDEX (default: all)")
    batch.add_argument("--resume", action="store_true", help="continue an existing OUTPUT: skip the images it holds")
    batch.add_argument("--overwrite", action="store_true", help="start an existing OUTPUT again")
    batch.add_argument("--in-flight", type=int, metavar="N",
                       help="images read, decoded or queued at once (default: 2 x max_batch_size + cores)")
    batch.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="a progress bar with images/s and ETA on stderr (default: when it is a terminal)")
    return parser


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topk", type=int, help="classify: number of classes")
    parser.add_argument("--threshold", type=float, help="detect: the lowest score answered")


def _task_params(args: argparse.Namespace) -> dict[str, str]:
    given = {"topk": args.topk, "threshold": args.threshold}
    return {k: str(v) for k, v in given.items() if v is not None}


def run_inspect(args: argparse.Namespace) -> int:
    checkpoint = local_checkpoint(args.checkpoint, args.sha256, args.settings)
    if args.config:
        print("\n".join(config_entry(checkpoint, args.trust_pickle, tuple(args.safe_global))))
        return 0
    folder: Path = checkpoint.resolve()
    if folder.suffix.lower() == ".onnx":
        return _inspect_onnx(folder)
    described = describe(folder) if folder.is_file() else None  # a packaged model: none of its code runs
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


def local_checkpoint(given: str, sha256: str | None = None, settings: Path | None = None) -> Path:
    """The checkpoint as a local path: a remote source is fetched (or found in the source cache) with the
    server settings of `settings` (or the default config) and SERVE_* overrides.

    Raises: ConfigError, CheckpointError: as the server would refuse the source.
    """
    if not is_remote(given):
        return Path(given)
    return Resolver(load_server_settings(settings).sources).resolve(given, sha256)


def config_entry(checkpoint: Path, trust_pickle: bool = False, safe_globals: tuple[str, ...] = ()) -> list[str]:
    """The lines of a models.yaml entry for a checkpoint (inspect --config): what the file answers filled
    in, what it can't a <...> placeholder.

    Raises:
        CheckpointError: the file can't be read (or is a pickle, without trust_pickle).
    """
    path = checkpoint.resolve()
    if path.suffix.lower() == ".onnx":
        _open_onnx(path)
        return [f"- name: {path.stem.lower().replace(' ', '_')}", f"  checkpoint: {path}", "  runtime: onnxruntime",
                "  labels: <labels.txt or a list: the model's class names>",
                "  preprocess: <{resize, crop, mean, std} the model was trained with>"]
    described = describe(path) if path.is_file() else None  # a packaged model: none of its code runs
    if described is not None:
        return packaged_entry(path, dict(described))
    allowed = resolve_safe_globals(list(safe_globals), "inspect")
    obj = read_checkpoint(weights_path(path), "cpu", trust_pickle=trust_pickle, allowed=allowed)
    return suggest_entry(path, obj, find_state_dict, safe_globals)


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


def _open_onnx(path: Path) -> None:
    """Raises: CheckpointError: what serving the file would fail on (one input, external data inside its folder)."""
    require("onnx", f"inspecting {path.name}", CheckpointError)
    try:
        open_onnx_file(path)
    except ServeError as exc:
        raise CheckpointError(exc.message) from None


def _inspect_onnx(path: Path) -> int:
    """An ONNX model's inputs, outputs, opset and external data files (read by onnx, nothing run)."""
    _open_onnx(path)
    import onnx

    model = onnx.load(str(path), load_external_data=False)

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
    service = PredictionService.load(config, include_lazy=True)
    for predictor in service.table.predictors.values():
        meta = predictor.metadata()
        print(
            f"{meta['name']}: ok, {predictor.task.summary()}, {meta['architecture']} on {meta['device']}, "
            f"runtime {_runtime_line(meta['runtime'])}{_precision_line(meta['runtime'])}, "
            f"{meta['checkpoint']['layout']}, loaded in {meta['load_time_s']}s"
        )
    service.close()
    return 0


def _precision_line(runtime: dict) -> str:
    """Where int8 was asked for: int8 and its gate's figures, or fp32 and why."""
    if runtime.get("requested_precision") in (None, "fp32"):
        return ""
    figures = runtime.get("int8") or {}
    gate, speed = figures.get("gate") or {}, figures.get("speed") or {}
    measured = ", ".join(f"{k} {v}" for k, v in gate.items())
    if speed:
        measured += f", {speed['speedup']}x fp32's speed (batch {speed['batch']})"
    if runtime["precision"] == "int8":
        return f", precision int8 (recipe {figures.get('recipe')}, gate passed: {measured}; cache {figures.get('cache')})"
    return f", precision fp32 (int8 refused: {runtime.get('precision_reason')}{f'; {measured}' if measured else ''})"


def run_quantize(args: argparse.Namespace) -> int:
    """Build each chosen model's int8 copy into the ONNX cache (precision int8, whatever the config says)
    and print its gate's figures; exits 1 where a model fails its gate."""
    config = load_config(args.config)
    names = [args.model] if args.model else [m.name for m in config.models]
    unknown = sorted(set(names) - {m.name for m in config.models})
    if unknown:
        raise InvalidRequestError(f"no model {unknown[0]!r} in the config (it has {[m.name for m in config.models]})")
    for m in config.models:  # what the config refuses with precision int8 (model_copy below doesn't validate)
        refusal = TASKS[m.task].int8_refusal or (
            "precision int8 runs on ONNX Runtime: set runtime auto or onnxruntime, not eager" if m.runtime == "eager" else None)
        if m.name in names and refusal:
            raise ConfigError(f"model '{m.name}': {refusal}")
    models = tuple(m.model_copy(update={"precision": "int8", "load": "eager", "versions": tuple(
        v.model_copy(update={"precision": None}) for v in m.versions)}) if m.name in names else m
        for m in config.models)
    service = PredictionService.load(config.model_copy(update={"models": models}), names=names, include_lazy=True)
    failed = 0
    try:
        for name in names:
            for version in service.table.versions(name).versions.values():
                runtime = version.predictor.describe_runtime()
                failed += runtime["precision"] != "int8"
                print(f"{name} version {version.version}: {json.dumps(runtime.get('int8'), indent=2)}")
                print(f"{name} version {version.version}: {_precision_line(runtime)[2:]}")
    finally:
        service.close()
    return 1 if failed else 0


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
    service = PredictionService.load(config, names=[name], include_lazy=True)
    try:
        answer = service.predict(Call(lambda _served: Inputs([data]), name, params=_task_params(args),
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


def run_serve(args: argparse.Namespace) -> int:
    """gunicorn through its Python API with the bundled settings (serve/server.py): what `gunicorn -c
    serve/gunicorn_conf.py "serve.app:create_app()"` runs. The flags go through the environment the
    settings file and every worker's create_app() read, so a flag and its variable mean the same; the
    server runs in a fresh interpreter (exec, the same process id) that has imported nothing of serve."""
    flags = {"SERVE_CONFIG": args.config and str(args.config.resolve()), "SERVE_HOST": args.host,
             "PORT": args.port, "WEB_CONCURRENCY": args.workers}
    for variable, value in flags.items():
        if value is not None:
            os.environ[variable] = str(value)
    if args.config is not None:
        load_config(args.config)  # a missing or invalid file: one line here, not a gunicorn traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "serve.server"])
    return 0  # not reached: execv replaces this process


def run_batch(args: argparse.Namespace) -> int:
    if args.in_flight is not None and args.in_flight < 1:
        raise InvalidRequestError(f"--in-flight must be at least 1, got {args.in_flight}")
    if args.resume and args.overwrite:
        raise InvalidRequestError("--resume and --overwrite exclude each other")
    shard = Shard.parse(args.shard)
    paths = select_shard(collect_inputs(args.inputs, [e.strip() for e in args.ext.split(",") if e.strip()]), shard)
    config, name = _batch_model(args)
    spec = config.model(name)
    in_flight = args.in_flight or default_in_flight(spec.max_batch_size, available_cores())
    fmt = args.format or ("csv" if args.output.suffix.lower() == ".csv" else "jsonl")
    service = PredictionService.load(batch_config(config, in_flight), names=[name], include_lazy=True)
    try:
        service.start_worker(busy_sessions=False)  # this process runs the model, as a lone server worker does
        served = service.table.served(name, None)
        params = _task_params(args)
        topk = served.task.parse_params(params).get("topk", 1)
        output = BatchOutput.open(args.output, fmt, served.task, topk=topk, resume=args.resume,
                                  overwrite=args.overwrite)
        summary = batch_run(service, paths, output, model=name, params=params, in_flight=in_flight,
                      progress=args.progress)
    finally:
        service.close()
    note = f", {summary.skipped} already there" if summary.skipped else ""
    print(f"{summary.output}: {summary.written} images ({summary.failed} failed{note}) in {summary.seconds:.1f}s, "
          f"{summary.images_per_s:.1f} images/s" + (f"; embeddings in {summary.embeddings}" if summary.embeddings else ""),
          file=sys.stderr)
    return 0


def _batch_model(args: argparse.Namespace) -> tuple[ServeConfig, str]:
    """The config and model a batch runs: --model of --config, or --checkpoint with inspect --config's entry.

    Raises:
        InvalidRequestError: flags of both kinds, or a checkpoint whose entry still has a placeholder.
    """
    overrides = {"architecture": args.architecture, "kwargs": args.kwargs, "labels": args.labels, "task": args.task}
    given = [f"--{k}" for k, v in overrides.items() if v is not None]
    if args.checkpoint is None:
        if given:
            raise InvalidRequestError(f"{', '.join(given)} go with --checkpoint (a config's model has its own)")
        config = load_config(args.config)
        name = args.model or config.models[0].name
        if name not in [m.name for m in config.models]:
            raise InvalidRequestError(f"no model '{name}' in {config.source}: it has {[m.name for m in config.models]}")
        return config, name
    if args.config is not None or args.model is not None:
        raise InvalidRequestError("--checkpoint replaces --config and --model: give one or the other")
    entry = yaml.safe_load("\n".join(config_entry(args.checkpoint)))[0]
    entry.update({k: v for k, v in overrides.items() if v is not None})
    if str(entry.get("labels", "")).startswith("<"):
        del entry["labels"]  # none: classes answered by index
    if str(entry.get("preprocess", "")).startswith("<"):
        del entry["preprocess"]  # ImageNet's defaults, as for a state_dict
    for field, value in entry.items():
        if isinstance(value, str) and value.startswith("<"):
            flag = {"architecture": "--architecture"}.get(field, f"a config (inspect {args.checkpoint} --config)")
            raise InvalidRequestError(f"{args.checkpoint}: the file doesn't say its {field} ({value}): give {flag}")
    return build_config({"models": [entry]}, base_dir=Path.cwd(), env=os.environ), entry["name"]
