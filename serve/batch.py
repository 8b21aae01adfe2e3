"""Offline batch prediction: a folder, list file or glob of images through the prediction core, to a file.

    paths = select_shard(collect_inputs("photos/"), Shard.parse("0/4"))
    service = PredictionService.load(batch_config(config, in_flight), names=[model], include_lazy=True)
    summary = run_batch(service, paths, BatchOutput.open(Path("out.jsonl"), "jsonl", task, resume=True),
                        model=model, params={"topk": "3"}, in_flight=16)

Every image goes through PredictionService.predict, as an HTTP request does: the same decoding, task,
batching and runtime (ONNX Runtime where runtime auto picks it). A pool of `in_flight` threads each
reads and decodes one image and waits for its answer, so reading and decoding run beside the forward
and the scheduler batches what the threads have queued; the results are written in input order as
they complete, so no more than `in_flight` images are held at once.

Output: one record per image, in input order: JSON Lines ({"path", "answer"} or {"path", "error"}) or,
for classify, CSV. A segmentation mask goes to a PNG file under <output>.masks/ (the line names it);
embeddings are also gathered, at the end, into <output>.npy, one row per line (NaN for a failed image).
Records are written whole, each line with one write() on an O_APPEND descriptor, so a run killed at
any moment (SIGKILL included) leaves whole lines, and `resume` continues it: a torn last line (a crash
of the machine) is dropped, and every path the file holds is skipped.

An image that can't be read or decoded (any 4xx of the core: invalid_image, image_too_large) is
recorded and the run goes on; a server-side error (5xx) stops it, with the output resumable.
"""
from __future__ import annotations

import base64
import csv
import glob
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from serve.config import ServeConfig
from serve.errors import InvalidRequestError, ServeError
from serve.service import Call, Inputs, PredictionService
from serve.tasks.base import Task

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMATS = ("jsonl", "csv")
# Admission is for a server's clients: here every image waits its turn, however long the queue.
BATCH_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class Shard:
    """Which part of the inputs this run takes: the sorted paths whose position i has i % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Raises: InvalidRequestError: not INDEX/COUNT with 0 <= INDEX < COUNT."""
        index, slash, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not slash or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise InvalidRequestError(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4), got '{text}'")
        return shard


def collect_inputs(source: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """The image paths `source` names, in input order:

    - a folder: every file below it (recursive) whose extension is one of `extensions`, sorted;
    - a list file (any other existing file): one path a line, relative to the list's folder, in its
      order; blank lines and lines starting with # are skipped;
    - otherwise a glob pattern (`**` recursive): the files it matches, sorted.

    Raises:
        InvalidRequestError: nothing by that name, an empty result, or a path listed twice.
    """
    text = str(source)
    path = Path(text)
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in wanted and p.is_file())
        what = f"folder {text} holds no file ending in {', '.join(sorted(wanted))}"
    elif path.is_file():
        if path.suffix.lower() in wanted:
            raise InvalidRequestError(f"{text} is an image: give its folder, a list file or a glob")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"cannot read the list file {text}: {exc}") from None
        base = path.parent
        paths = [str(base / line.strip()) if not os.path.isabs(line.strip()) else line.strip()
                 for line in lines if line.strip() and not line.lstrip().startswith("#")]
        what = f"list file {text} names no image"
    elif glob.has_magic(text):
        paths = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        what = f"glob {text} matches no file"
    else:
        raise InvalidRequestError(f"{text}: no such folder or list file, and not a glob pattern")
    if not paths:
        raise InvalidRequestError(what)
    repeated = sorted({p for p in paths if paths.count(p) > 1}) if len(set(paths)) != len(paths) else []
    if repeated:
        raise InvalidRequestError(f"{text} names {len(repeated)} paths more than once, e.g. {repeated[0]}")
    return paths


def select_shard(paths: Sequence[str], shard: Shard) -> list[str]:
    """This shard's paths, in input order: position i of the sorted paths goes to shard i % count."""
    if shard.count == 1:
        return list(paths)
    mine = {p for i, p in enumerate(sorted(paths)) if i % shard.count == shard.index}
    return [p for p in paths if p in mine]


def batch_config(config: ServeConfig, in_flight: int) -> ServeConfig:
    """The config with admission opened for a batch run: every queued image is waited for (no 503s
    for a long queue, no deadline), and the queue takes the whole in-flight window."""
    server = config.server.model_copy(update={
        "max_queue": max(config.server.max_queue, in_flight),
        "max_queue_wait_ms": BATCH_TIMEOUT_S * 1000,
        "request_timeout_s": BATCH_TIMEOUT_S,
        "shed_hold_ms": 0.0,
    })
    return config.model_copy(update={"server": server})


def default_in_flight(max_batch_size: int, cores: int) -> int:
    """Images in flight: two batches queued behind the running one keep the forward fed while every
    core beside it reads and decodes."""
    return 2 * max_batch_size + cores


@dataclass(frozen=True)
class Record:
    """One image's line: its answer (the task's JSON) or its error, and a mask PNG to write first."""

    path: str
    answer: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    mask_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BatchSummary:
    output: Path
    total: int  # this run's inputs (after sharding)
    skipped: int  # already in the output (resume)
    written: int
    failed: int
    seconds: float
    embeddings: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class BatchOutput:
    """The output file: opened for appending whole records; with resume, what it already holds."""

    def __init__(self, path: Path, fmt: str, task: str, topk: int, done: set[str], fd: int):
        self.path = path
        self.format = fmt
        self.task = task
        self.topk = topk
        self.done = done
        self._fd = fd
        self.masks_dir = path.with_name(path.name + ".masks")

    @classmethod
    def open(cls, path: Path, fmt: str, task: Task, *, topk: int = 1, resume: bool = False,
             overwrite: bool = False) -> BatchOutput:
        """Open (or create) the output for `task`'s answers. An existing file is continued with `resume`
        (a torn last line dropped), started again with `overwrite`, and refused otherwise.

        Raises:
            InvalidRequestError: an unknown format, csv for a task not answering ranked classes, an existing
                output without resume or overwrite, or one that isn't this format's.
        """
        ranked = "predictions" in task.Result.model_fields
        task = task.name
        if fmt not in FORMATS:
            raise InvalidRequestError(f"--format must be one of {list(FORMATS)}, got '{fmt}'")
        if fmt == "csv" and not ranked:
            raise InvalidRequestError(f"--format csv is for models answering ranked classes (predictions); this "
                                      f"model's task is '{task}': use jsonl")
        exists = path.exists() and path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise InvalidRequestError(f"{path} exists: --resume continues it, --overwrite starts it again")
        path.parent.mkdir(parents=True, exist_ok=True)
        done: set[str] = set()
        if exists and resume:
            done = _read_done(path, fmt, _csv_header(topk))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if not resume else 0), 0o644)
        output = cls(path, fmt, task, topk, done, fd)
        if fmt == "csv" and not done and os.fstat(fd).st_size == 0:
            output._write_line(_csv_line(_csv_header(topk)))
        return output

    def write(self, record: Record) -> None:
        """Write one record whole (its mask PNG first, so a line never names a missing file)."""
        answer = record.answer
        if record.mask_png is not None and answer is not None:
            mask_path = self.masks_dir / _mask_name(record.path)
            _write_file(mask_path, record.mask_png)
            mask = {k: v for k, v in answer["mask"].items() if k != "data"}
            answer = {**answer, "mask": {**mask, "file": os.path.relpath(mask_path, self.path.parent)}}
        if self.format == "csv":
            self._write_line(_csv_line(_csv_row(record, answer, self.topk)))
        else:
            line = {"path": record.path, **({"answer": answer} if record.error is None else {"error": record.error})}
            self._write_line(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")

    def _write_line(self, line: str) -> None:
        data = line.encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # a regular file takes it whole; a full disk raises instead
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write_embeddings(self) -> Path | None:
        """<output>.npy: every line's embedding, in the file's line order (NaN rows for failed images);
        None when no line holds one."""
        if self.format != "jsonl":
            return None
        vectors = [(line.get("answer") or {}).get("embedding") for line in _jsonl_lines(self.path)]
        dim = next((len(v) for v in vectors if v is not None), None)
        if dim is None:
            return None
        matrix = np.full((len(vectors), dim), np.nan, dtype=np.float32)
        for row, vector in enumerate(vectors):
            if vector is not None:
                matrix[row] = vector
        target = self.path.with_suffix(".npy")
        buffer = io.BytesIO()
        np.save(buffer, matrix)
        _write_file(target, buffer.getvalue())
        return target


def run_batch(service: PredictionService, paths: Sequence[str], output: BatchOutput, *, model: str | None = None,
              params: Mapping[str, str] | None = None, in_flight: int = 8, progress: bool | None = None) -> BatchSummary:
    """Predict every path not already in `output`, writing records in input order.

    progress: a progress bar on stderr (images/s, ETA); None: only when stderr is a terminal.

    Raises:
        InvalidRequestError: bad parameters (before any image is read).
        ServeError: a server-side failure (5xx) of the core; what was written stays, resumable.
    """
    from tqdm import tqdm

    params = dict(params or {})
    served = service.table.served(model, None)
    served.task.parse_params(params)  # bad parameters fail here, not once per image
    todo = [p for p in paths if p not in output.done]
    started = time.perf_counter()
    written = failed = 0
    bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, smoothing=0.1, file=sys.stderr,
               disable=None if progress is None else not progress)
    pool = ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="batch")
    window: deque[Future] = deque()
    queue = iter(todo)
    try:
        _fill(window, queue, pool, service, served.name, params, in_flight)
        while window:
            record = window.popleft().result()
            _fill(window, queue, pool, service, served.name, params, in_flight)
            output.write(record)
            written += 1
            failed += record.error is not None
            bar.update()
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        output.close()
    embeddings = output.write_embeddings()
    return BatchSummary(output.path, len(paths), len(paths) - len(todo), written, failed,
                        time.perf_counter() - started, embeddings)


def _fill(window: deque[Future], queue: Iterable[str], pool: ThreadPoolExecutor, service: PredictionService,
          model: str, params: dict[str, str], in_flight: int) -> None:
    while len(window) < in_flight:
        path = next(queue, None)  # type: ignore[call-overload]
        if path is None:
            return
        window.append(pool.submit(predict_file, service, path, model, params))


def predict_file(service: PredictionService, path: str, model: str | None, params: Mapping[str, str]) -> Record:
    """One image's record: its answer, or the error that the file itself caused (unreadable, not an
    image, too large).

    Raises:
        ServeError: a failure of the core, not of the file (5xx).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Record(path, error={"code": "unreadable", "message": f"cannot read {path}: {exc.strerror or exc}"})
    try:
        answer = service.predict(Call(lambda _served: Inputs([data]), model, params=params, answer_format="json"))
    except ServeError as exc:
        if exc.status >= 500:
            raise
        return Record(path, error={"code": exc.code, "message": exc.message})
    result = answer.results()[0].to_dict()
    mask = result.get("mask")  # a class map (segmentation) as a base64 PNG; a detection's masks are RLE, inside
    mask = base64.b64decode(mask["data"]) if isinstance(mask, dict) and "data" in mask else None
    return Record(path, answer=result, mask_png=mask)


# --- the files ----------------------------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name and rename it: never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _mask_name(path: str) -> str:
    """The mask's file under <output>.masks/: the image's path (any '..' or root made a plain folder
    name) with .png added, so a.jpg and a.png don't collide."""
    parts = [("__" if part == ".." else part) for part in PurePosixPath(Path(path).as_posix()).parts
             if part not in ("/", ".")]
    return str(PurePosixPath(*parts)) + ".png"


def _truncate_torn_tail(path: Path) -> bytes:
    """The file's whole lines; a last line without its newline (torn by a crash) is cut off the file."""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        os.truncate(path, len(whole))
    return whole


def _jsonl_lines(path: Path) -> list[dict]:
    lines = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise InvalidRequestError(f"{path} line {number} is not a batch record (JSON with a 'path'): "
                                      "is it another file?")
        lines.append(value)
    return lines


def _read_done(path: Path, fmt: str, header: list[str]) -> set[str]:
    """The paths an existing output holds (a torn last line dropped first).

    Raises:
        InvalidRequestError: the file isn't a batch output of this format (and topk).
    """
    text = _truncate_torn_tail(path)
    if fmt == "jsonl":
        return {line["path"] for line in _jsonl_lines(path)}
    rows = list(csv.reader(io.StringIO(text.decode("utf-8"))))
    if rows and rows[0] != header:
        raise InvalidRequestError(f"{path} has the columns {rows[0][:6]}..., not this run's {header[:6]}... "
                                  "(another file, or another --topk)")
    return {row[0] for row in rows[1:] if row}


def _csv_header(topk: int) -> list[str]:
    ranks = [f"{name}_{k}" for k in range(1, topk + 1) for name in ("label", "index", "probability")]
    return ["path", "error", *ranks]


def _csv_row(record: Record, answer: dict | None, topk: int) -> list[str]:
    if answer is None:
        error = record.error or {}
        return [record.path, f"{error.get('code')}: {error.get('message')}", *[""] * (3 * topk)]
    cells = [record.path, ""]
    predictions = answer["predictions"]
    for k in range(topk):
        p = predictions[k] if k < len(predictions) else None
        cells += [p["label"], str(p["index"]), repr(p["probability"])] if p else ["", "", ""]
    return cells


def _csv_line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()
