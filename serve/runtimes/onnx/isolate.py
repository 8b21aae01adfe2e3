"""Isolation: ONNX Runtime work run in a short-lived forked child that sends its arrays back through a pipe."""
from __future__ import annotations

import io
import os
import select
import signal
import time
from collections.abc import Callable

import numpy as np

from serve.errors import ExportError
from serve.runtimes.onnx.reasons import first_line

VERIFY_TIMEOUT_S = 600.0


def run_in_child(work: Callable[[], list[list[np.ndarray]]]) -> list[list[np.ndarray]]:
    """work() run in a forked child, which may import onnxruntime, sends its arrays back through a pipe and
    leaves with os._exit: this process never imports onnxruntime, so it may fork workers later (the fork rule).

    work is forked, never pickled: a closure or a bound method is fine.

    Raises:
        ExportError: work raised (its reason), the child died without an answer, or it ran past
        VERIFY_TIMEOUT_S (it is killed).
    """
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
                                f"{type(exc).__name__}: {first_line(exc)}").encode()
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
