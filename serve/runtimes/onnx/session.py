"""The session: OnnxRuntime, an ONNX model run by ONNX Runtime sessions made in the process that runs them."""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.cores import available_cores, batch_share
from serve.errors import ExportError
from serve.runtimes.onnx.export import INPUT_NAME
from serve.runtimes.onnx.isolate import run_in_child
from serve.runtimes.onnx.layout import unflatten
from serve.runtimes.onnx.reasons import first_line

log = logging.getLogger(__package__)


class OnnxRuntime:
    """An ONNX model and the ONNX Runtime sessions that run it in this process (made on first use).

    Threads: a session's intra-op pool is fixed when it is made, so there are up to two: one of `threads`
    for a batch that has the cores to itself, one of `load_threads` for a batch whose share of the cores
    (serve.cores.batch_share) is smaller. Fork: sessions belong to the process that made them (os.getpid()
    is checked on every forward); the serialized model is shared copy-on-write by forked workers.
    """

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
        batch whose share of the cores is smaller (docs/runtimes.md, Threads, has the measurements)."""
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
            runs = run_in_child(lambda: self.run_numpy(flat, self.threads))
        starts = np.cumsum([0] + sizes)
        return [self._rebuild(runs[a:b]) for a, b in zip(starts[:-1], starts[1:])]

    def run_numpy(self, arrays: list[np.ndarray], threads: int) -> list[list[np.ndarray]]:
        """One session run an array (the batch, or each image of a per-image model): its outputs."""
        session = self._session(threads)
        try:
            return [session.run(None, {self.input_name: array}) for array in arrays]
        except Exception as exc:  # onnxruntime's own error types
            raise ExportError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from None

    def _rebuild(self, runs: list[list[np.ndarray]]) -> Any:
        structures = [unflatten(self.layout, [torch.from_numpy(a) for a in outputs]) for outputs in runs]
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
        # The fork rule: onnxruntime is imported here, when a session is made, never at module level. Merely
        # importing it starts a thread that makes every child forked afterwards hang at exit, and a process
        # that forks workers later (the gunicorn master with preload) must stay fork-safe.
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
            raise ExportError(f"ONNX Runtime can't open the model: {first_line(exc)}") from None

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


def check_cuda_provider(device: torch.device) -> None:
    """Raises: ExportError: the installed onnxruntime has no CUDAExecutionProvider."""
    import onnxruntime as ort  # a device cuda process runs ONNX Runtime in-process anyway (forward_isolated)

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError(f"device {device}: the installed onnxruntime has no CUDAExecutionProvider "
                          f"(it has {ort.get_available_providers()}; install onnxruntime-gpu)")


def _images(batch, per_image: bool) -> list:
    if not per_image:
        return [batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))]
    return list(batch)


def _as_array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()
