"""OnnxRuntime: a module exported to ONNX once (cached on disk), checked against eager, run by ONNX Runtime.

    runtime = build_onnx_runtime(module, sample, cache_key_parts={...}, cache_dir=path, rule="probabilities")
    runtime.forward(batch)     # float32 [N, C, H, W], normalized -> what module(batch) returns, as CPU tensors
    runtime.describe()         # {"runtime": "onnxruntime", "export_s", "cache", "providers", "threads", ...}
    runtime.forward_isolated(*batches) # the same, run in a short-lived child process (see Fork)
    open_onnx_file(path)       # an .onnx checkpoint, with its external data beside it, served as it is
    compare_outputs(eager, onnx, rule) # None when they agree, else the reason

Every failure (export, verification, a file ONNX Runtime can't use) raises ExportError whose message is
the reason; the caller runs the module eagerly instead (or refuses an .onnx checkpoint).

Export: torch.onnx.export's TorchScript-based exporter (dynamo=False) first, the dynamo exporter when it
fails. Measured with torch 2.14 on 2 cores: TorchScript exports resnet18 in 0.4 s (dynamo 4 s),
EfficientNet-Lite0 in 2.8 s (6 s), deeplabv3/lraspp with dynamic height and width in 0.5/3 s (13/12 s),
with outputs equal to dynamo's; fasterrcnn_mobilenet_v3_large_320_fpn (a list of images in) exports
only with TorchScript (dynamo: torch.export fails on its data-dependent code). TorchScript also traces
Python control flow on tensor values silently (one branch baked in), so the result is always checked
against eager on an input unlike the export sample (other values, batch size and, when dynamic, size).
The batch axis is dynamic; height and width too with dynamic_hw. A module returning a list of dicts
(torchvision detection) is exported for one image [C, H, W] of any size and run image by image.

Verification rules (compare_outputs), eager against ONNX on the same input; each task names its rule
(Task.runtime_rule):
    probabilities  (classify) softmax probabilities within 1e-4, same top-5 in the same order for every
                   image (classes whose eager probabilities are within 1e-6, a tie, may change places)
    vectors        (embed) cosine similarity >= 0.9999 per image, max |diff| <= 1e-4 x max |eager value|
    class_map      (segment) >= 99.9 % of each image's pixels have the same argmax class
    detections     (detect) per image, the same number of detections scored >= score_threshold, each
                   eager one matched by an ONNX one with the same label, score within 1e-4, box corners
                   within 0.01 px

Cache: one file a key, `<key>.onnx` plus `<key>.json` (the key's parts, the file's sha256). The key
hashes the caller's parts (checkpoint sha256, architecture, kwargs, task), the input shape, dynamic
axes, opset, exporter and the torch / onnx / onnxscript / onnxruntime versions. Files are written to
a temporary name and os.replace'd; before use the sha256, the ONNX parse and the key stored in the model's
metadata_props are checked, and anything wrong (truncated, foreign, not ONNX) is exported again and
overwritten. A cache directory that can't be written is used read-only (a warm, read-only cache is
fine: e.g. baked into an image): the export is kept in memory and a warning logged.

Fork: ONNX Runtime's threads don't survive fork(), and with onnxruntime 1.31 merely importing it
starts a thread whose state makes every forked child hang at exit (pthread_cond_destroy in a static
destructor; microsoft/onnxruntime#31961 is about the same class of bug). So a process that forks
workers later (the gunicorn master with preload) must never import onnxruntime: this module imports
it only when a session is made, build_onnx_runtime verifies in a forked child that reports back
through a pipe and leaves with os._exit, and forward_isolated does the same for warm-up. Sessions are
made lazily in the process that runs them (os.getpid() checked on every forward); the serialized model
stays in the parent's memory and the workers share its pages copy-on-write.

Threads: a session's intra-op pool is fixed when it is made, so a worker (Predictor) has two: one with
`threads` threads (every core) for a batch that has every core to itself, and one with load_threads
(1) for a batch whose share is smaller (serve/cores.py's batch_share: other workers of the server
running batches, or other processes holding cores). Why the second: served by 2 workers on 2 cores,
resnet18 at c=16 made 50-51 req/s with it against 42-44 with the 2-thread session alone (two rounds,
one run, nothing shed; EfficientNet-Lite0 was level, 154-157 against 133-160); and beside two
CPU-bound processes in scheduling groups of their own (as containers on a node are), a lone request
took 27.5 and 32.5 ms p50 on the 2-thread session against 16.2 ms on one thread (tests/test_busy_host.py,
two runs; weak evidence, as thread placement alone swung such comparisons up to 2x either way there):
the group's CPU share doesn't grow with its threads, only their waiting does. (In-process,
beside busy loops in the process's own group, 2 threads had looked no worse: EfficientNet-Lite0 b1
9.9-13.7 against 9.7-16.9 ms; there more threads simply took more of the neighbours' time.) The
threads don't spin after a run (session.intra_op.allow_spinning=0: spinning cost resnet18 54 ms of
CPU per b1 request instead of 39 ms, at the same latency). Each session holds its own copy of the
optimized weights (sharing them through add_external_initializers saved nothing measurable: ONNX
Runtime's graph optimizations make new ones): the second costs about 60 MB RSS for EfficientNet-Lite0
and 100 MB for resnet18 a worker. SERVE_TORCH_THREADS (a fixed thread count) gives one session of
that many threads.

GPU: device cuda uses CUDAExecutionProvider when the installed onnxruntime has it (the onnxruntime-gpu
wheel); otherwise ExportError says so and the model runs eagerly.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import select
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from serve.cores import available_cores, batch_share
from serve.errors import ExportError
from serve.extras import require

log = logging.getLogger(__name__)

OPSET = 18
CACHE_FORMAT = 1  # bump when the export recipe or the files' layout changes: old entries stop matching
KEY_PROP = "torch_serve.key"
LAYOUT_PROP = "torch_serve.layout"
EXPORTER_PROP = "torch_serve.exporter"
EXPORTERS = ("torchscript", "dynamo")
INPUT_NAME = "input"
VERIFY_TIMEOUT_S = 600.0

PROB_TOL = 1e-4
TIE_TOL = 1e-6
TOPK = 5
EMBED_MIN_COSINE = 0.9999
EMBED_REL_TOL = 1e-4
SEGMENT_MIN_AGREEMENT = 0.999
SCORE_TOL = 1e-4
BOX_TOL_PX = 0.01


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/torch-serve/onnx, else ~/.cache/torch-serve/onnx (the caller passes the environment)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "torch-serve" / "onnx"


# ---- output layouts: what the eager module returns, flattened to ONNX's list of outputs and back ----

def _flatten(output: Any) -> tuple[dict, list[torch.Tensor]]:
    """Raises: ExportError: an output structure ONNX serving doesn't rebuild."""
    if isinstance(output, torch.Tensor):
        return {"kind": "tensor"}, [output]
    if isinstance(output, Mapping) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        return {"kind": "dict", "keys": [str(k) for k in output]}, list(output.values())
    if isinstance(output, (tuple, list)) and output and all(isinstance(v, torch.Tensor) for v in output):
        return {"kind": type(output).__name__, "n": len(output)}, list(output)
    if (isinstance(output, list) and output and all(isinstance(o, Mapping) for o in output)
            and all(isinstance(v, torch.Tensor) for v in output[0].values())):
        return {"kind": "per_image", "keys": [str(k) for k in output[0]]}, list(output[0].values())
    raise ExportError(
        f"the model returns {_describe_type(output)}; ONNX serving rebuilds a tensor, a tuple, list or dict "
        f"of tensors, or a list of dicts of tensors (one per image)"
    )


def _describe_type(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {sorted({type(o).__name__ for o in obj}) or 'nothing'}"
    return f"a {type(obj).__name__}"


def _unflatten(layout: Mapping, tensors: list[torch.Tensor]) -> Any:
    kind = layout["kind"]
    if kind == "tensor":
        return tensors[0]
    if kind in ("dict", "per_image"):
        return dict(zip(layout["keys"], tensors))
    return tuple(tensors) if kind == "tuple" else list(tensors)


def _output_names(layout: Mapping) -> list[str]:
    if layout["kind"] == "tensor":
        return ["output"]
    if layout["kind"] in ("dict", "per_image"):
        return [f"output.{key}" for key in layout["keys"]]
    return [f"output.{i}" for i in range(layout["n"])]


# ---- export ----

def export_onnx(module: nn.Module, sample: torch.Tensor, layout: Mapping, *, dynamic_hw: bool = False,
                exporter: str = "auto") -> tuple[bytes, str, list[str]]:
    """Export module to ONNX bytes for inputs shaped like sample; return them, the exporter used and the
    tracer's warnings (the TorchScript exporter warns where it baked in a value).

    Raises:
        ExportError: every exporter tried failed; names each one's reason.
    """
    per_image = layout["kind"] == "per_image"
    if per_image:  # detection: a list with one image [C, H, W], of any height and width
        args: tuple = ([sample[0]],)
        input_axes = {1: "height", 2: "width"}
    else:  # a batch of 2: the dynamo exporter specializes a batch of 1 into a constant
        args = (torch.cat([sample[:1], sample[:1]]),)
        input_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    names = _output_names(layout)
    reasons = []
    for name in EXPORTERS if exporter == "auto" else (exporter,):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                data = (_export_torchscript if name == "torchscript" else _export_dynamo)(
                    module, args, names, input_axes, per_image)
            traced = [str(w.message).strip().splitlines()[0] for w in caught
                      if issubclass(w.category, torch.jit.TracerWarning)]
            return data, name, traced
        except Exception as exc:  # any exporter failure is a reason to report, never a crash
            reasons.append(f"{name} exporter: {_export_reason(exc)}")
    raise ExportError("ONNX export failed: " + "; ".join(reasons))


def _export_torchscript(module, args, names, input_axes, per_image) -> bytes:
    output_axes = {n: {0: "detections" if per_image else "batch"} for n in names}
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                      output_names=names, dynamic_axes={INPUT_NAME: input_axes, **output_axes})
    return buffer.getvalue()


def _export_dynamo(module, args, names, input_axes, per_image) -> bytes:
    dims = {axis: torch.export.Dim.DYNAMIC for axis in input_axes}
    shapes = ([dims],) if per_image else (dims,)
    program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                output_names=names, dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


def _export_reason(exc: BaseException) -> str:
    """One line out of an exporter's exception: the dynamo exporter's 'Exception summary', else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = re.search(r"## Exception summary\s*\n(.+)", text)
    if summary:
        line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", summary.group(1).strip())
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        line = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return line[:400]


def _with_metadata(data: bytes, props: Mapping[str, str]) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    for entry in list(model.metadata_props):
        if entry.key in props:
            model.metadata_props.remove(entry)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


# ---- cache ----

def _versions() -> dict[str, str]:
    """torch / onnx / onnxscript / onnxruntime versions, read without importing onnxruntime (see Fork)."""
    found = {"torch": torch.__version__}
    for name, dists in (("onnx", ("onnx",)), ("onnxscript", ("onnxscript",)),
                        ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
        for dist in dists:
            try:
                found[name] = f"{dist} {metadata.version(dist)}"
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found[name] = "missing"
    return found


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key[:32]}.onnx", cache_dir / f"{key[:32]}.json"


def read_cached(cache_dir: Path, key: str) -> tuple[bytes | None, dict[str, str], str | None]:
    """The cached model for key and its metadata_props, or None and why not (None: no file; else what
    is wrong with it)."""
    model_path, meta_path = _cache_paths(cache_dir, key)
    if not model_path.exists() and not meta_path.exists():
        return None, {}, None
    try:
        meta = json.loads(meta_path.read_text())
        data = model_path.read_bytes()
    except (OSError, ValueError) as exc:
        return None, {}, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None, {}, "its sidecar names another key"
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None, {}, f"sha256 mismatch ({len(data)} bytes: truncated or changed)"
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
        return None, {}, f"not an ONNX model ({type(exc).__name__})"
    if props.get(KEY_PROP) != key:
        return None, {}, "the ONNX model inside was made for another key"
    return data, props, None


def write_cached(cache_dir: Path, key: str, data: bytes, parts: Mapping[str, Any]) -> str | None:
    """Write model and sidecar atomically; None when done, else why not (the caller logs it)."""
    model_path, meta_path = _cache_paths(cache_dir, key)
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest(), "parts": parts},
                      indent=1, sort_keys=True, default=str).encode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, content in ((model_path, data), (meta_path, meta)):
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        return f"{exc.strerror or exc} ({cache_dir})"
    return None


# ---- the runtime ----

class OnnxRuntime:
    """An ONNX model and the ONNX Runtime sessions that run it in this process (made on first use)."""

    name = "onnxruntime"

    def __init__(self, model: bytes | Path, layout: Mapping, *, device: torch.device = torch.device("cpu"),
                 threads: int = 1, load_threads: int | None = None, info: Mapping[str, Any] | None = None,
                 input_name: str = INPUT_NAME):
        """model: serialized ONNX (kept here, shared copy-on-write by forked workers) or a file's path.
        threads: the session's intra-op threads; load_threads: a second session's, used while
        serve.cores.batch_share (the batch's share of the cores) is below threads; None: no
        second session."""
        self.model = model
        self.input_name = input_name
        self.layout = dict(layout)
        self.device = torch.device(device)
        self.threads = max(1, threads)
        self.load_threads = load_threads if load_threads and load_threads < self.threads else None
        self.info = dict(info or {})
        self._sessions: dict[int, Any] = {}
        self._pid: int | None = None
        self._inherited: list[Any] = []  # sessions a parent made before fork: never destroyed here
        self._lock = threading.Lock()

    def use_threads(self, threads: int | None) -> None:
        """The threads to serve with: `threads` fixed (SERVE_TORCH_THREADS), one session of that many;
        None, one session with every core and, with more than one core, a single-threaded one for a
        batch whose share of the cores is smaller (see Threads in the module docstring)."""
        self.threads = max(1, threads or available_cores())
        self.load_threads = None if threads or self.threads == 1 else 1

    @property
    def per_image(self) -> bool:
        return self.layout["kind"] == "per_image"

    @property
    def providers(self) -> list[str]:
        return (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda"
                else ["CPUExecutionProvider"])

    def forward(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        """A float32 batch [N, C, H, W] (normalized; for a per-image model also a list of [C, H, W]) ->
        the structure the eager module returns, as CPU tensors.

        Raises:
            ExportError: ONNX Runtime can't open the model here.
        """
        shared = self.load_threads is not None and batch_share(self.threads) < self.threads
        threads = self.load_threads if shared else self.threads
        return self._rebuild(self.run_numpy([_as_array(x) for x in _images(batch, self.per_image)], threads))

    def forward_isolated(self, *batches: torch.Tensor | Sequence[torch.Tensor]) -> list[Any]:
        """forward for each batch, run in one forked child when this process has not imported onnxruntime
        (it may fork workers later); in this process otherwise (already imported, a GPU, or no fork).

        Raises:
            ExportError: the model fails to open or run, or the child doesn't answer.
        """
        arrays = [[_as_array(x) for x in _images(batch, self.per_image)] for batch in batches]
        sizes = [len(a) for a in arrays]
        flat = [a for per_batch in arrays for a in per_batch]
        if "onnxruntime" in sys.modules or self.device.type == "cuda" or not hasattr(os, "fork"):
            runs = self.run_numpy(flat, self.threads)
        else:
            runs = _in_child(lambda: self.run_numpy(flat, self.threads))
        starts = np.cumsum([0] + sizes)
        return [self._rebuild(runs[a:b]) for a, b in zip(starts[:-1], starts[1:])]

    def run_numpy(self, arrays: list[np.ndarray], threads: int) -> list[list[np.ndarray]]:
        """One session run an array (the batch, or each image of a per-image model): its outputs."""
        session = self._session(threads)
        try:
            return [session.run(None, {self.input_name: array}) for array in arrays]
        except Exception as exc:  # onnxruntime's own error types
            raise ExportError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from None

    def _rebuild(self, runs: list[list[np.ndarray]]) -> Any:
        structures = [_unflatten(self.layout, [torch.from_numpy(a) for a in outputs]) for outputs in runs]
        return structures if self.per_image else structures[0]

    def _session(self, threads: int):
        if self._pid != os.getpid() and self._pid is not None:
            self._lock = threading.Lock()  # a forked child: the parent's lock may have been held at the fork
        with self._lock:
            if self._pid != os.getpid():
                if self._sessions:
                    # Destroying a parent's session here would join threads this process doesn't have.
                    log.warning("ONNX Runtime sessions made in process %s before a fork are left unused in %s",
                                self._pid, os.getpid())
                    self._inherited.extend(self._sessions.values())
                self._sessions, self._pid = {}, os.getpid()
            if threads not in self._sessions:
                self._sessions[threads] = self._new_session(threads)
            return self._sessions[threads]

    def _new_session(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: initializer notes are not news
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            check_cuda_provider(self.device)
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime's own error types
            raise ExportError(f"ONNX Runtime can't open the model: {_first_line(exc)}") from None

    def describe(self) -> dict:
        return {
            "runtime": self.name,
            "export_s": self.info.get("export_s"),
            "verify_s": self.info.get("verify_s"),
            "exporter": self.info.get("exporter"),
            "cache": self.info.get("cache", "disabled"),
            "cache_note": self.info.get("cache_note"),
            "providers": self.providers,
            "threads": self.threads,
            "load_threads": self.load_threads,
            "sessions": sorted(self._sessions) if self._pid == os.getpid() else [],  # made in this process
        }


def _images(batch, per_image: bool) -> list:
    if not per_image:
        return [batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))]
    return list(batch)


def _as_array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:400]


def check_cuda_provider(device: torch.device) -> None:
    """Raises: ExportError: the installed onnxruntime has no CUDAExecutionProvider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError(f"device {device}: the installed onnxruntime has no CUDAExecutionProvider "
                          f"(it has {ort.get_available_providers()}; install onnxruntime-gpu)")


def _in_child(work) -> list[list[np.ndarray]]:
    """Run work() in a forked child that imports onnxruntime, send its arrays back through a pipe, and
    leave with os._exit: the parent never imports onnxruntime (see Fork in the module docstring)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: numpy and onnxruntime only (torch's thread pool didn't survive the fork)
        code = 1
        try:
            os.close(read_fd)
            runs = work()
            payload = io.BytesIO()
            np.savez(payload, **{f"{i}_{j}": a for i, outputs in enumerate(runs) for j, a in enumerate(outputs)})
            message, code = b"ok" + payload.getvalue(), 0
        except BaseException as exc:
            message = b"er" + (exc.message if isinstance(exc, ExportError) else
                                f"{type(exc).__name__}: {_first_line(exc)}").encode()
        finally:
            try:
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(message)
            finally:
                os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + VERIFY_TIMEOUT_S
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ExportError(f"ONNX Runtime did not finish within {VERIFY_TIMEOUT_S:g}s in its check process")
            chunk = os.read(pipe.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if data[:2] == b"er":
        raise ExportError(data[2:].decode(errors="replace"))
    if data[:2] != b"ok":
        raise ExportError(f"ONNX Runtime's check process died (wait status {status}) without an answer")
    arrays = np.load(io.BytesIO(data[2:]), allow_pickle=False)
    runs: dict[int, dict[int, np.ndarray]] = {}
    for name in arrays.files:
        i, j = map(int, name.split("_"))
        runs.setdefault(i, {})[j] = arrays[name]
    return [[outputs[j] for j in sorted(outputs)] for _, outputs in sorted(runs.items())]


# ---- building ----

def build_onnx_runtime(module: nn.Module, sample: torch.Tensor, *, cache_key_parts: Mapping[str, Any],
                       cache_dir: Path | None, rule: str | None = "probabilities", dynamic_hw: bool = False,
                       device: torch.device | str = "cpu", threads: int | None = None,
                       load_threads: int | None = None, exporter: str = "auto",
                       score_threshold: float = 0.5) -> OnnxRuntime:
    """Export module (or take its cached export), check it against eager with `rule`, return the runtime.

    sample: a float32 batch [N, C, H, W] as forward will get (the shape is part of the cache key).
    cache_key_parts: what identifies the weights and the model (checkpoint sha256, architecture,
    kwargs, task). threads, load_threads: see OnnxRuntime (threads defaults to the cores available).
    rule: a compare_outputs rule, or None to skip the check.

    Raises:
        ExportError: the export, the check or the device failed; the message is the reason.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, "ONNX Runtime", ExportError)
    device = torch.device(device)
    if device.type == "cuda":
        check_cuda_provider(device)
    module.eval()
    sample = sample.detach().to(device, torch.float32)
    try:
        with torch.inference_mode():
            eager = _call(module, sample)
    except Exception as exc:  # the user's module: any failure is a reason to run it eagerly (and fail there)
        raise ExportError(f"the module fails on a sample {list(sample.shape)}: {_first_line(exc)}") from None
    layout, _ = _flatten(eager)
    parts = {
        **{k: v for k, v in cache_key_parts.items()},
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "input": list(sample.shape[1:]), "dynamic_hw": dynamic_hw, "layout": layout,
        "opset": OPSET, "exporter": exporter, "format": CACHE_FORMAT, **_versions(),
    }
    key = cache_key(parts)
    info: dict[str, Any] = {"cache": "disabled", "export_s": None, "exporter": None}
    data = None
    if cache_dir is not None:
        data, props, problem = read_cached(Path(cache_dir), key)
        if data is not None:
            info.update(cache="hit", exporter=props.get(EXPORTER_PROP))
            log.info("ONNX cache hit: %s", _cache_paths(Path(cache_dir), key)[0])
        elif problem:
            log.warning("ONNX cache file %s is not used: %s; exporting again",
                        _cache_paths(Path(cache_dir), key)[0], problem)
            info["cache_note"] = f"rebuilt: {problem}"
    if data is None:
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # tracing needs ordinary tensors
            raw, used, traced = export_onnx(module, sample, layout, dynamic_hw=dynamic_hw, exporter=exporter)
        data = _with_metadata(raw, {KEY_PROP: key, LAYOUT_PROP: json.dumps(layout), EXPORTER_PROP: used})
        info.update(export_s=round(time.perf_counter() - started, 3), exporter=used, trace_warnings=traced)
        if cache_dir is not None:
            problem = write_cached(Path(cache_dir), key, data, parts)
            if problem is None:
                info["cache"] = "miss"
            else:
                log.warning("ONNX cache directory can't be written: %s; the export is kept in memory only", problem)
                info.update(cache="unwritable", cache_note=f"not written: {problem}")
    runtime = OnnxRuntime(data, layout, device=device, threads=threads or available_cores(),
                          load_threads=load_threads, info=info)
    if rule is not None:
        started = time.perf_counter()
        reason = verify(runtime, module, sample, rule, dynamic_hw=dynamic_hw, score_threshold=score_threshold)
        runtime.info["verify_s"] = round(time.perf_counter() - started, 3)
        if reason is not None:
            warned = info.get("trace_warnings")
            hint = f" (the exporter warned: {warned[0]})" if warned else ""
            raise ExportError(f"ONNX output differs from eager ({rule} rule): {reason}{hint}")
    return runtime


def _call(module: nn.Module, batch: torch.Tensor) -> Any:
    """module(batch); a module that takes a list of images (torchvision detection) gets one."""
    try:
        return module(batch)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return module(list(batch))


def verification_inputs(sample: torch.Tensor, dynamic_hw: bool = False) -> list[torch.Tensor]:
    """The sample, and 3 seeded normal-random images (another batch size, other values and, with dynamic
    height and width, another size): an input the export never saw, for traced-in Python branches."""
    n, c, h, w = sample.shape
    if dynamic_hw:
        h, w = h + 32, max(32, w - 32)
    noise = torch.randn((3, c, h, w), generator=torch.Generator().manual_seed(0)).to(sample.device)
    return [sample, noise]


def verify(runtime: OnnxRuntime, module: nn.Module, sample: torch.Tensor, rule: str, *,
           dynamic_hw: bool = False, score_threshold: float = 0.5) -> str | None:
    """Run eager and ONNX on verification_inputs; None when they agree under `rule`, else the reason.

    Raises:
        ExportError: ONNX Runtime can't open or run the model.
    """
    batches = verification_inputs(sample, dynamic_hw)
    with torch.inference_mode():
        eager = [_call(module, batch) for batch in batches]
    onnx_outputs = runtime.forward_isolated(*batches)
    for i, (batch, e, o) in enumerate(zip(batches, eager, onnx_outputs)):
        reason = compare_outputs(e, o, rule, score_threshold=score_threshold)
        if reason is not None:
            what = "the export sample" if i == 0 else f"a random batch of {len(batch)} {list(batch.shape[1:])}"
            return f"on {what}: {reason}"
    return None


def open_onnx_file(path: Path, device: torch.device | str = "cpu", threads: int | None = None,
                   load_threads: int | None = None) -> OnnxRuntime:
    """An .onnx file served directly; external data files must lie beside it (or below its folder).

    The file is checked here without onnxruntime (it is opened by the process that runs it): it parses,
    has one input, and every external data file it names exists inside its folder.

    Raises:
        ExportError: missing file, not ONNX, several inputs, missing or escaping external data.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, f"an ONNX checkpoint ({path})", ExportError)
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise ExportError(f"{path}: tensor '{tensor.name}' points outside its folder ({location})")
        if not target.is_file():
            raise ExportError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
    layout, input_name = _model_io(model, str(path))
    return OnnxRuntime(path, layout, device=torch.device(device), threads=threads or available_cores(),
                       load_threads=load_threads, info={"cache": "file"}, input_name=input_name)


def open_onnx_bytes(data: bytes, name: str, device: torch.device | str = "cpu", threads: int | None = None) -> OnnxRuntime:
    """A serialized ONNX model held in memory (a TorchServe archive's serialized file): no external data.

    Raises:
        ExportError: not ONNX, several inputs, or weights in external files.
    """
    for package in ("onnx", "onnxruntime"):
        require(package, f"an ONNX model ({name})", ExportError)
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{name} is not an ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError(f"{name} keeps weights in external data files, which can't be read from here")
    layout, input_name = _model_io(model, name)
    return OnnxRuntime(data, layout, device=torch.device(device), threads=threads or available_cores(),
                       info={"cache": "file"}, input_name=input_name)


def _model_io(model, name: str) -> tuple[dict, str]:
    """An ONNX model's output layout (from our export's metadata, else by its outputs) and its one input.

    Raises:
        ExportError: not exactly one input.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{name} has {len(inputs)} inputs {inputs}; one image batch input expected")
    props = {p.key: p.value for p in model.metadata_props}
    layout = json.loads(props[LAYOUT_PROP]) if LAYOUT_PROP in props else (
        {"kind": "tensor"} if len(model.graph.output) == 1 else {"kind": "tuple", "n": len(model.graph.output)})
    return layout, inputs[0]


# ---- verification rules ----

def compare_outputs(eager: Any, onnx: Any, rule: str, *, score_threshold: float = 0.5) -> str | None:
    """None when ONNX's output agrees with eager's under `rule` (see the module docstring), else the reason.

    Raises:
        ValueError: an unknown rule (a programming error, not a model's).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}'; known: {sorted(RULES)}")
    if rule == "detections":
        return _compare_detect(eager, onnx, score_threshold)
    e, o = _main_tensor(eager).float().cpu(), _main_tensor(onnx).float().cpu()
    if e.shape != o.shape:
        return f"output shape {list(o.shape)} differs from eager {list(e.shape)}"
    return RULES[rule](e, o)


def _main_tensor(output: Any) -> torch.Tensor:
    """The tensor a rule judges: a tuple's first, a dict's 'out' (torchvision segmentation) or first."""
    if isinstance(output, Mapping):
        return output["out"] if "out" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _compare_classify(e: torch.Tensor, o: torch.Tensor) -> str | None:
    if e.ndim > 2:  # a score map: averaged spatially into class scores, as the predictor does
        e, o = e.flatten(2).mean(-1), o.flatten(2).mean(-1)
    e, o = e.softmax(-1), o.softmax(-1)
    diff = (e - o).abs()
    if diff.max() > PROB_TOL:
        image, cls = divmod(int(diff.argmax()), e.shape[-1])
        return f"max |Δp| {diff.max():.1e} > {PROB_TOL:g} (image {image}, class {cls})"
    k = min(TOPK, e.shape[-1])
    for i in range(len(e)):
        top_e, top_o = e[i].topk(k).indices, o[i].topk(k).indices
        tie = (e[i][top_e] - e[i][top_o]).abs().max() <= TIE_TOL
        if not torch.equal(top_e, top_o) and not tie:
            return f"top-{k} differs for image {i}: eager {top_e.tolist()}, ONNX {top_o.tolist()}"
    return None


def _compare_embed(e: torch.Tensor, o: torch.Tensor) -> str | None:
    e, o = e.flatten(1), o.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(e, o, dim=1)
    if cosine.min() < EMBED_MIN_COSINE:
        return f"cosine similarity {cosine.min():.6f} < {EMBED_MIN_COSINE} (image {int(cosine.argmin())})"
    limit = EMBED_REL_TOL * float(e.abs().max())
    worst = float((e - o).abs().max())
    if worst > limit:
        return f"max |Δ| {worst:.1e} > {EMBED_REL_TOL:g} x max |eager| = {limit:.1e}"
    return None


def _compare_segment(e: torch.Tensor, o: torch.Tensor) -> str | None:
    if e.ndim != 4:
        return f"output {list(e.shape)} is not [batch, classes, height, width]"
    same = (e.argmax(1) == o.argmax(1)).flatten(1).float().mean(1)
    if same.min() < SEGMENT_MIN_AGREEMENT:
        return (f"image {int(same.argmin())}: {100 * float(same.min()):.2f} % of pixels have the same argmax "
                f"class (at least {100 * SEGMENT_MIN_AGREEMENT:g} % needed)")
    return None


def _compare_detect(eager: Any, onnx: Any, threshold: float) -> str | None:
    if not isinstance(eager, list) or not isinstance(onnx, list) or len(eager) != len(onnx):
        return f"expected one detection dict an image, got {_describe_type(eager)} and {_describe_type(onnx)}"
    for i, (e, o) in enumerate(zip(eager, onnx)):
        if not all(k in d for d in (e, o) for k in ("boxes", "labels", "scores")):
            return f"image {i}: detections need boxes, labels and scores"
        keep_e, keep_o = e["scores"] >= threshold, o["scores"] >= threshold
        if int(keep_e.sum()) != int(keep_o.sum()):
            return (f"image {i}: {int(keep_e.sum())} detections scored >= {threshold:g} in eager, "
                    f"{int(keep_o.sum())} in ONNX")
        boxes, labels, scores = (o[k][keep_o].float().cpu() for k in ("boxes", "labels", "scores"))
        free = list(range(len(scores)))
        for box, label, score in zip(*(e[k][keep_e].float().cpu() for k in ("boxes", "labels", "scores"))):
            near = [m for m in free if labels[m] == label and abs(scores[m] - score) <= SCORE_TOL
                    and (boxes[m] - box).abs().max() <= BOX_TOL_PX]
            if not near:
                return (f"image {i}: eager detection (label {int(label)}, score {float(score):.4f}, box "
                        f"{[round(v, 2) for v in box.tolist()]}) has no ONNX match within {BOX_TOL_PX:g} px")
            free.remove(min(near, key=lambda m: float((boxes[m] - box).abs().max())))
    return None


RULES = {"probabilities": _compare_classify, "vectors": _compare_embed, "class_map": _compare_segment,
         "detections": _compare_detect}
