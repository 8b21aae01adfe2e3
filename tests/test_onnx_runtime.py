"""serve/runtimes/onnx/ and the tasks' verification rules: export, the check against eager, the cache, .onnx files,
fork safety."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from torch import nn

from conftest import tiny_net
from serve.cores import sharing_as
from serve.errors import ExportError
from serve.runtimes.onnx import build_onnx_runtime, open_onnx_file
from serve.runtimes.onnx import cache as onnx_cache
from serve.runtimes.onnx.cache import read_cached
from serve.tasks import TASKS
from serve.tasks.classify import Classify
from serve.tasks.detect import Detect
from serve.tasks.embed import Embed
from serve.tasks.segment import Segment

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"sha256": "0" * 64, "architecture": "models.tiny:TinyNet", "kwargs": {"num_classes": 3}, "task": "classify"}


def build_tiny(cache_dir, **kwargs):
    return build_onnx_runtime(tiny_net(), torch.zeros(1, 3, 8, 8), cache_key_parts=PARTS, cache_dir=cache_dir,
                              threads=1, **kwargs)


class MatrixExp(nn.Module):
    """An op neither exporter can write in ONNX."""

    def forward(self, x):
        return torch.linalg.matrix_exp(x[:, 0]).flatten(1)


class Branchy(nn.Module):
    """Python control flow on a tensor's value: the tracer bakes in the branch the export sample took."""

    def forward(self, x):
        scores = x.flatten(2).mean(-1)
        if x.amax() > 1:
            return scores * 2
        return scores * -3


class SegNet(nn.Module):
    """A 1x1 conv returning a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_tiny_net_outputs_are_exact(tmp_path):
    runtime = build_tiny(tmp_path)
    batch = torch.zeros(2, 3, 8, 8)
    batch[0, 1] = 0.5  # image 0: green channel mean 0.5 -> logits 2 * means + 1
    batch[1, 2] = 1.0
    logits = runtime.forward(batch)
    assert torch.allclose(logits, torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 3.0]]))
    described = runtime.describe()
    assert described["runtime"] == "onnxruntime" and described["cache"] == "miss"
    assert described["exporter"] == "torchscript" and described["providers"] == ["CPUExecutionProvider"]
    assert described["export_s"] > 0 and described["threads"] == 1 and described["load_threads"] is None


def test_without_load_threads_one_session_whatever_the_core_share(tmp_path):
    runtime = build_onnx_runtime(tiny_net(), torch.zeros(1, 3, 8, 8), cache_key_parts=PARTS, cache_dir=None,
                                 threads=2)
    for share in (1, 2):
        with sharing_as(share):
            assert torch.allclose(runtime.forward(torch.ones(1, 3, 8, 8)), torch.full((1, 3), 3.0))
    assert set(runtime._sessions) == {2}


def test_use_threads_pinned_gives_one_session_and_shared_gives_a_second_single_threaded_one():
    from serve.cores import available_cores

    runtime = build_onnx_runtime(tiny_net(), torch.zeros(1, 3, 8, 8), cache_key_parts=PARTS, cache_dir=None)
    runtime.use_threads(1)  # SERVE_TORCH_THREADS=1
    assert (runtime.threads, runtime.load_threads) == (1, None)
    runtime.use_threads(None)  # the default: every core, and one thread for a smaller share
    assert runtime.threads == available_cores()
    assert runtime.load_threads == (1 if available_cores() > 1 else None)


@pytest.mark.slow
def test_resnet18_matches_eager(tmp_path):
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    runtime = build_onnx_runtime(module, torch.zeros(1, 3, 64, 64), cache_key_parts=PARTS, cache_dir=tmp_path,
                                 threads=2, load_threads=1)
    batch = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = module(batch)
    for share in (1, 2):  # the busy workers' share of the cores: the single-threaded session, the 2-thread one
        with sharing_as(share):
            assert Classify.verify_runtime(eager, runtime.forward(batch)) is None
    assert set(runtime._sessions) == {1, 2}
    assert runtime.describe()["threads"] == 2 and runtime.describe()["load_threads"] == 1


@pytest.mark.slow
def test_an_op_without_onnx_form_is_a_reason(tmp_path):
    with pytest.raises(ExportError) as caught:
        build_onnx_runtime(MatrixExp(), torch.rand(1, 3, 4, 4), cache_key_parts=PARTS, cache_dir=tmp_path)
    message = caught.value.message
    assert message.startswith("ONNX export failed: torchscript exporter: ")
    assert "aten::linalg_matrix_exp" in message and "dynamo exporter: " in message
    assert not list(tmp_path.iterdir())  # nothing cached


def test_a_traced_in_branch_fails_the_check(tmp_path):
    # The zero sample takes the "* -3" branch; the random check batch has values above 1.
    with pytest.raises(ExportError) as caught:
        build_onnx_runtime(Branchy(), torch.zeros(1, 3, 4, 4), cache_key_parts=PARTS, cache_dir=None)
    assert caught.value.message.startswith("ONNX output differs from eager (probabilities rule): on a random batch of 3 ")
    assert "max |Δp|" in caught.value.message
    assert "(the exporter warned: Converting a tensor to a Python boolean might cause the trace to be incorrect" in (
        caught.value.message)


def test_segmentation_with_any_height_and_width(tmp_path):
    torch.manual_seed(0)
    module = SegNet().eval()
    runtime = build_onnx_runtime(module, torch.zeros(1, 3, 16, 16), cache_key_parts=PARTS, cache_dir=tmp_path,
                                 verify=Segment.verify_runtime, dynamic_hw=True)
    batch = torch.randn(2, 3, 20, 28)
    out = runtime.forward(batch)
    assert set(out) == {"out"} and out["out"].shape == (2, 4, 20, 28)
    with torch.inference_mode():
        assert Segment.verify_runtime(module(batch), out) is None


def test_warm_cache_is_used_without_exporting(tmp_path):
    first = build_tiny(tmp_path)
    (model_file,) = tmp_path.glob("*.onnx")
    before = model_file.stat()
    second = build_tiny(tmp_path)
    after = model_file.stat()
    # An export would have os.replace'd a new file: same inode and mtime mean it was only read.
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert second.describe()["cache"] == "hit" and second.describe()["export_s"] is None
    assert second.describe()["exporter"] == "torchscript" and second.model == first.model
    other = build_onnx_runtime(tiny_net(), torch.zeros(1, 3, 8, 8), cache_key_parts={**PARTS, "sha256": "1" * 64},
                               cache_dir=tmp_path, threads=1)
    assert other.describe()["cache"] == "miss" and len(list(tmp_path.glob("*.onnx"))) == 2


def foreign_model(tmp_path) -> bytes:
    """A valid ONNX model that belongs to another cache key."""
    build_onnx_runtime(SegNet(), torch.zeros(1, 3, 4, 4), cache_key_parts=PARTS, cache_dir=tmp_path / "other",
                       verify=None)
    return next((tmp_path / "other").glob("*.onnx")).read_bytes()


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "sha256 mismatch"),
    ("garbage", "not an ONNX model"),
    ("foreign", "made for another key"),
    ("no_sidecar", "unreadable"),
])
def test_damaged_or_foreign_cache_file_is_rebuilt(tmp_path, caplog, damage, reason):
    cache = tmp_path / "cache"
    build_tiny(cache)
    (model_file,) = cache.glob("*.onnx")
    sidecar = model_file.with_suffix(".json")
    good = model_file.read_bytes()
    if damage == "truncate":
        model_file.write_bytes(good[: len(good) // 2])
    elif damage == "no_sidecar":
        sidecar.unlink()
    else:  # bytes whose sidecar agrees with them: only the content check can refuse them
        content = b"\x08\x07garbage, not protobuf" * 10 if damage == "garbage" else foreign_model(tmp_path)
        model_file.write_bytes(content)
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "sha256": hashlib.sha256(content).hexdigest()}))
    with caplog.at_level(logging.WARNING, "serve.runtimes.onnx"):
        runtime = build_tiny(cache)
    assert runtime.describe()["cache"] == "miss"
    assert runtime.describe()["cache_note"].startswith("rebuilt: ") and reason in runtime.describe()["cache_note"]
    assert reason in caplog.text and "exporting again" in caplog.text
    assert model_file.read_bytes() == runtime.model
    assert read_cached(cache, json.loads(sidecar.read_text())["key"])[0] == runtime.model
    assert torch.allclose(runtime.forward(torch.ones(1, 3, 8, 8)), torch.full((1, 3), 3.0))


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only; as root (which chmod doesn't stop), the disk refuses the write instead."""
    def make(path: Path):
        path.chmod(0o555)
        if os.access(path, os.W_OK):  # root
            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")
            monkeypatch.setattr(onnx_cache.tempfile, "mkstemp", refuse)
    return make


def test_read_only_cache_dir_exports_in_memory(tmp_path, caplog, read_only):
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(cache)
    with caplog.at_level(logging.WARNING, "serve.runtimes.onnx"):
        runtime = build_tiny(cache)
    assert runtime.describe()["cache"] == "unwritable" and "can't be written" in caplog.text
    assert not list(cache.iterdir())
    assert torch.allclose(runtime.forward(torch.ones(1, 3, 8, 8)), torch.full((1, 3), 3.0))


def test_warm_read_only_cache_is_read(tmp_path, read_only):
    build_tiny(tmp_path)
    read_only(tmp_path)
    assert build_tiny(tmp_path).describe()["cache"] == "hit"


@pytest.mark.slow
def test_onnx_file_with_external_data(tmp_path):
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    exported = tmp_path / "exported.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(module, (torch.zeros(2, 3, 64, 64),), exported, dynamo=False, input_names=["pixels"],
                          dynamic_axes={"pixels": {0: "batch"}})
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(onnx.load(exported), folder / "resnet.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="resnet.weights", size_threshold=1024)
    assert (folder / "resnet.weights").stat().st_size > (folder / "resnet.onnx").stat().st_size
    runtime = open_onnx_file(folder / "resnet.onnx", threads=1)
    batch = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert Classify.verify_runtime(module(batch), runtime.forward(batch)) is None
    assert runtime.describe()["cache"] == "file" and runtime.describe()["export_s"] is None

    (folder / "resnet.weights").rename(tmp_path / "elsewhere")
    with pytest.raises(ExportError, match="external data file 'resnet.weights' of tensor '.*' is missing"):
        open_onnx_file(folder / "resnet.onnx")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a model at all" * 20, "is not an ONNX model"),
])
def test_bad_onnx_file(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=message):
        open_onnx_file(path)


FORK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np, torch
    from models.tiny import TinyCNN
    from serve.runtimes.onnx import build_onnx_runtime
    torch.manual_seed(0)
    module = TinyCNN(num_classes=10).eval()
    runtime = build_onnx_runtime(module, torch.zeros(1, 3, 64, 64), cache_key_parts={}, cache_dir=None, threads=2)
    if sys.argv[1] == "parent_first":
        runtime.forward(torch.zeros(1, 3, 64, 64))  # a session (and its threads) in the parent
    imported_before_fork = "onnxruntime" in sys.modules
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out_file = sys.argv[2]
    pid = os.fork()
    if pid == 0:
        np.save(out_file, runtime.forward(batch).numpy())
        if sys.argv[1] == "parent_first":
            os._exit(0)  # the parent imported onnxruntime: a normal exit would hang (docs/runtimes.md, Fork safety)
        sys.exit(0)  # a normal exit, as a gunicorn worker's: atexit, finalizers, C++ static destructors
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
    status = os.waitstatus_to_exitcode(done[1]) if done[0] else "hung"
    with torch.inference_mode():
        eager = module(batch)
    parent = runtime.forward(batch)
    child = torch.from_numpy(np.load(out_file)) if status == 0 else None
    print(json.dumps({"status": status, "imported_before_fork": imported_before_fork,
                      "child_vs_parent": None if child is None else float((child - parent).abs().max()),
                      "parent_vs_eager": float((parent - eager).abs().max())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["child_only", "parent_first"])
def test_fork_safety(tmp_path, mode):
    """Built in a parent, run in a forked child: the child makes its own session, answers as the parent does
    and exits cleanly; with child_only the parent never imported onnxruntime and the child exits normally."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT, mode, str(tmp_path / "child.npy")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0
    assert report["imported_before_fork"] is (mode == "parent_first")
    assert report["child_vs_parent"] == 0.0
    assert report["parent_vs_eager"] < 1e-4


def probs(rows):
    return torch.tensor(rows).log()  # logits whose softmax is rows


def test_each_task_names_its_rule():
    """The rule's function name is the name the messages give ("... (probabilities rule)")."""
    assert {name: task.verify_runtime.__name__ for name, task in TASKS.items()} == {
        "classify": "probabilities", "embed": "vectors", "segment": "class_map", "detect": "detections"}


@pytest.mark.parametrize("eager, onnx_out, task, reason", [
    (probs([[0.7, 0.2, 0.1]]), probs([[0.7, 0.2, 0.1]]), Classify, None),
    (probs([[0.7, 0.2, 0.1]]), probs([[0.6999, 0.2001, 0.1]]), Classify, "max |Δp| 1.0e-04 > 0.0001 (image 0, class 0)"),
    (probs([[0.5, 0.3, 0.2]]), probs([[0.5, 0.29996, 0.20004]]), Classify, None),
    (probs([[0.2, 0.3000001, 0.2999999, 0.1, 0.05, 0.05]]), probs([[0.2, 0.2999999, 0.3000001, 0.1, 0.05, 0.05]]),
     Classify, None),  # a tie may swap
    (probs([[0.3, 0.2, 0.15, 0.10002, 0.09998, 0.07, 0.05, 0.03]]),
     probs([[0.3, 0.2, 0.15, 0.09998, 0.10002, 0.07, 0.05, 0.03]]), Classify,
     "top-5 differs for image 0: eager [0, 1, 2, 3, 4], ONNX [0, 1, 2, 4, 3]"),
    (torch.ones(2, 3), torch.ones(2, 4), Classify, "output shape [2, 4] differs from eager [2, 3]"),
    (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0001]]), Embed, None),
    (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.001]]), Embed, "max |Δ| 1.0e-03 > 0.0001 x max |eager| = 2.0e-04"),
    (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), Embed, "cosine similarity 0.000000 < 0.9999 (image 0)"),
])
def test_verify_runtime(eager, onnx_out, task, reason):
    assert task.verify_runtime(eager, onnx_out) == reason


def test_compare_segmentation():
    eager = torch.zeros(1, 2, 40, 50)
    eager[:, 1] = 1.0
    onnx_out = eager.clone()
    onnx_out[0, 0, 0, :2] = 2.0  # 2 of 2000 pixels: 99.9 % agree, just enough
    assert Segment.verify_runtime({"out": eager}, {"out": onnx_out}) is None
    onnx_out[0, 0, 0, 2] = 2.0
    assert Segment.verify_runtime({"out": eager}, {"out": onnx_out}) == (
        "image 0: 99.85 % of pixels have the same argmax class (at least 99.9 % needed)")


def detections(*rows):
    return {"boxes": torch.tensor([r[:4] for r in rows]).reshape(-1, 4), "labels": torch.tensor([r[4] for r in rows]),
            "scores": torch.tensor([r[5] for r in rows])}


@pytest.mark.parametrize("onnx_out, reason", [
    (detections((10, 10, 50, 50, 3, 0.9), (0, 0, 5, 5, 1, 0.6), (1, 1, 2, 2, 7, 0.1)), None),
    (detections((0.001, 0, 5, 5, 1, 0.6), (10, 10, 50.005, 50, 3, 0.9)), None),  # order may differ
    (detections((10, 10, 50, 50, 3, 0.9)), "image 0: 2 detections scored >= 0.5 in eager, 1 in ONNX"),
    (detections((10, 10, 50, 50, 3, 0.9), (0, 0, 5, 5.1, 1, 0.6)),
     "image 0: eager detection (label 1, score 0.6000, box [0.0, 0.0, 5.0, 5.0]) has no ONNX match within 0.01 px"),
    (detections((10, 10, 50, 50, 3, 0.9), (0, 0, 5, 5, 2, 0.6)),
     "image 0: eager detection (label 1, score 0.6000, box [0.0, 0.0, 5.0, 5.0]) has no ONNX match within 0.01 px"),
])
def test_compare_detections(onnx_out, reason):
    eager = [detections((10, 10, 50, 50, 3, 0.9), (0, 0, 5, 5, 1, 0.6), (3, 3, 4, 4, 2, 0.2))]
    assert Detect.verify_runtime(eager, [onnx_out]) == reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda(tmp_path):
    """With onnxruntime-gpu: the CPU test on the GPU; with the CPU wheel: the reason says what to install."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ExportError, match="no CUDAExecutionProvider .*install onnxruntime-gpu"):
            build_tiny(tmp_path, device="cuda")
        return
    runtime = build_onnx_runtime(tiny_net().cuda(), torch.zeros(1, 3, 8, 8, device="cuda"), cache_key_parts=PARTS,
                                 cache_dir=tmp_path, device="cuda")
    assert runtime.describe()["providers"][0] == "CUDAExecutionProvider"
    assert torch.allclose(runtime.forward(torch.ones(1, 3, 8, 8, device="cuda")), torch.full((1, 3), 3.0))
