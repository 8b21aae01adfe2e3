"""torch.export programs (torch.export.save, usually a .pt2 file): read with torch.export.load and
run as ep.module(), whatever batch sizes the program was exported for.

What loading runs (read in torch 2.14's torch/export/pt2_archive/_package.py,
torch/_export/serde/serialize.py and torch/export/_unlift.py): torch.export.load is not a
weights-only reader. It unpickles with weights_only=False every weight or constant stored pickled
(tensor subclasses), and the sample inputs when a weights-only read of them fails; it pickle.loads
opaque constants; it parses every symbolic shape with sympy.sympify, which eval()s the string; and
ep.module() exec()s the program's guards_code. A crafted file therefore runs Python here, so a
program is read only when the config says `trust_code: true` for it. `python -m serve inspect`
reads the program's JSON without any of that.

Batch sizes: a program exported with a dynamic batch dimension takes any batch within its range.
One exported with a static batch (`torch.export.export(model, (torch.rand(1, 3, 224, 224),))`) or a
range that max_batch_size leaves is run in pieces no larger than its largest batch, each padded with
zero images up to its smallest and the padding's outputs dropped. So any max_batch_size serves with
the same answers; a static batch of 1 runs image by image (no speed-up from batching).
"""
from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import nn

from serve.config import ModelSpec
from serve.errors import CheckpointError, ConfigError
from serve.formats.opened import EXPORTED, Opened
from serve.formats.state_dict import error_line
from serve.formats.torchscript import refuse_architecture

log = logging.getLogger(__name__)


def matches(names: list[str]) -> bool:
    """torch.export.save's layout: <top>/archive_format and <top>/models/<name>.json (since torch 2.8),
    or the older serialized_exported_program.json."""
    if "serialized_exported_program.json" in names:
        return True
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return False
    root = roots.pop()
    return f"{root}/archive_format" in names and any(
        name.startswith(f"{root}/models/") and name.endswith(".json") for name in names
    )


class BatchRange(nn.Module):
    """An exported program run on any batch: in pieces no larger than its largest batch, each padded
    with zeros up to its smallest; outputs (tensors, or tuples, lists, dicts of them) cut back to size."""

    def __init__(self, program: nn.Module, smallest: int, largest: int | None):
        super().__init__()
        self.program = program
        self.smallest, self.largest = smallest, largest

    def train(self, mode: bool = True) -> BatchRange:
        # ep.module() refuses train() and eval(): the program runs as exported (checked: eval mode).
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        if self.smallest <= len(x) and (self.largest is None or len(x) <= self.largest):
            return self.program(x)
        pieces = []
        for piece in x.split(self.largest or len(x)):
            size = len(piece)
            if size < self.smallest:
                piece = torch.cat([piece, piece.new_zeros((self.smallest - size, *piece.shape[1:]))])
            pieces.append(_cut(self.program(piece), size))
        return _join(pieces)


def _cut(output: Any, size: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[:size]
    if isinstance(output, (tuple, list)):
        return type(output)(_cut(o, size) for o in output)
    if isinstance(output, dict):
        return {k: _cut(v, size) for k, v in output.items()}
    raise CheckpointError(f"an exported program's {type(output).__name__} output can't be split by batch")


def _join(pieces: list[Any]) -> Any:
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, (tuple, list)):
        return type(first)(_join(list(parts)) for parts in zip(*pieces))
    return {k: _join([p[k] for p in pieces]) for k in first}


def read(spec: ModelSpec) -> torch.export.ExportedProgram:
    """torch.export.load, once the config consented to the code it runs.

    Raises:
        CheckpointError: no consent, or the file can't be deserialized.
    """
    path = spec.checkpoint
    if not spec.trust_code:
        raise CheckpointError(
            f"model '{spec.name}': {path.name} is a torch.export program; torch.export.load runs Python "
            f"from the file (it unpickles pickled payloads, eval()s symbolic shapes and exec()s the "
            f"program's guards), so it is refused unless you trust the file: set trust_code: true for "
            f"this model, or serve a TorchScript file or a state_dict with architecture: instead"
        )
    log.warning("model '%s': reading %s with torch.export.load because trust_code is set: it can run code",
                spec.name, path)
    try:
        return torch.export.load(path)
    except Exception as exc:  # a trusted deserializer of arbitrary content: any failure means unusable
        raise CheckpointError(f"torch.export program {path} could not be loaded: {error_line(exc)}") from None


def training_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The program's operators called with training=True or train=True (batch norm, dropout): it was
    exported from a module in train mode, and unlike nn.Module it can't be switched to eval."""
    found = []
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            if argument.name in ("training", "train"):
                value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
                if value is True:
                    found.append(str(node.target))
    return sorted(set(found))


def batch_range(program: torch.export.ExportedProgram, spec: ModelSpec) -> tuple[int, int | None]:
    """The smallest and largest batch the program takes (largest None: unbounded), after checking
    that its one input is an image batch the spec's preprocessing produces.

    Raises:
        CheckpointError: the program takes other inputs than one tensor [N, C, H, W].
        ConfigError: its static channels or size differ from the spec's preprocess.
    """
    where = f"model '{spec.name}': torch.export program {spec.checkpoint.name}"
    names = list(program.graph_signature.user_inputs)
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    value = nodes[names[0]].meta.get("val") if len(names) == 1 and names[0] in nodes else None
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        shown = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(
            f"{where} takes {len(names)} input(s) ({shown}); this server feeds one image batch [N, C, H, W]"
        )
    pre = spec.preprocess
    for axis, (field, wanted) in enumerate((("mode", pre.channels), ("crop", pre.crop), ("crop", pre.crop)), 1):
        size = value.shape[axis]
        if isinstance(size, int) and size != wanted:
            raise ConfigError(
                f"{where} was exported for inputs {_shape(value)}, but field 'preprocess.{field}' gives "
                f"{[pre.channels, pre.crop, pre.crop]}; set preprocess to match"
            )
    batch = value.shape[0]
    if isinstance(batch, int):
        return batch, batch
    bounds = program.range_constraints.get(batch.node.expr)
    if bounds is None:
        return 1, None
    upper = bounds.upper  # a sympy Integer, or torch's int_oo (which calls itself finite) for no bound
    return max(1, int(bounds.lower)), (int(upper) if isinstance(upper, sympy.Integer) else None)


def _shape(value: torch.Tensor) -> list:
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def open_model(spec: ModelSpec, device: torch.device) -> Opened:
    """Raises: CheckpointError, ConfigError: see read, batch_range and refuse_architecture."""
    refuse_architecture(spec, EXPORTED)
    program = read(spec)
    where = f"model '{spec.name}': torch.export program {spec.checkpoint.name}"
    training = training_ops(program)
    if training:
        raise CheckpointError(
            f"{where} was exported in training mode ({', '.join(training)} with training=True); "
            f"call model.eval() before torch.export.export"
        )
    smallest, largest = batch_range(program, spec)
    if largest is not None and largest < spec.max_batch_size or smallest > 1:
        log.info("%s takes batches of %s..%s: max_batch_size %d runs in pieces", where, smallest,
                 largest if largest is not None else "any", spec.max_batch_size)
    try:
        module = program.module()
    except Exception as exc:  # trusted program code (guards): any failure means unusable
        raise CheckpointError(f"{where} could not be turned into a module: {error_line(exc)}") from None
    batches = f"batch {smallest}" if smallest == largest else f"batch {smallest}..{largest or 'any'}"
    return Opened(BatchRange(module, smallest, largest), f"torch.export program ({batches})")


def describe(path: Path) -> list[tuple[str, str]]:
    """The program's inputs, batch range, weights and what torch.export.load would run, from its JSON.

    Raises:
        CheckpointError: the JSON is missing or unreadable.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            programs = [n for n in names if re.fullmatch(r"[^/]+/models/[^/]+\.json", n)]
            if not programs:
                return [("program", "an older (torch < 2.8) layout: load it with trust_code: true to see more")]
            program = json.loads(archive.read(programs[0]))
            root = programs[0].split("/", 1)[0]
            model = programs[0].rsplit("/", 1)[1].removesuffix(".json")
            wanted = (f"{root}/data/weights/{model}_weights_config.json",
                      f"{root}/data/constants/{model}_constants_config.json")
            configs = [json.loads(archive.read(n)) for n in wanted if n in names]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"torch.export program {path} is unreadable: {error_line(exc)}") from None
    graph = program["graph_module"]["graph"]
    signature = program["graph_module"]["signature"]
    inputs = [spec["user_input"]["arg"] for spec in signature["input_specs"] if "user_input" in spec]
    shown = []
    for arg in inputs:
        name = arg.get("as_tensor", {}).get("name")
        sizes = graph["tensor_values"].get(name, {}).get("sizes", []) if name else []
        shown.append(f"{name}: [{', '.join(_size(s) for s in sizes)}]" if name else json.dumps(arg)[:60])
    ranges = ", ".join(f"{k} in {v['min_val']}..{v['max_val']}" for k, v in program.get("range_constraints", {}).items())
    payloads = [meta for config in configs for meta in config.get("config", {}).values()]
    pickled = sum(bool(meta.get("use_pickle")) or not meta["path_name"].startswith(("weight_", "tensor_"))
                  for meta in payloads)
    return [
        ("inputs", "; ".join(shown) or "none"),
        ("dynamic", ranges or "none (every size static)"),
        ("payloads", f"{len(payloads)} weights and constants, {pickled} of them pickled"),
        ("saved by", f"torch {program.get('torch_version', '?')}"),
        ("loading", "runs the file's code (pickles, eval'd shapes, exec'd guards): needs trust_code: true"),
    ]


def _size(size: dict) -> str:
    if "as_int" in size:
        return str(size["as_int"])
    text = size.get("as_expr", {}).get("expr_str", "?")
    match = re.fullmatch(r"Symbol\('(\w+)'.*\)", text)
    return match.group(1) if match else text[:40]
