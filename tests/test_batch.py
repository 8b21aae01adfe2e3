"""The batch command: a folder, list file or glob through the prediction core, in order, resumable."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, tiny_model_config, tiny_net, write_config
from PIL import Image
from servers import ROOT

from models.bright import BrightSegmenter
from serve.batch import Shard, collect_inputs, select_shard
from serve.cli import main
from serve.config import load_config
from serve.app import create_app
from serve.errors import InvalidRequestError, ServeError
from serve.service import Call, Inputs, PredictionService

IMAGES = 200
BROKEN = {"broken/empty.jpg": b"", "broken/text.png": b"not an image at all",
          "broken/cut.jpg": None}  # None: a real JPEG cut in half (its header reads, its data doesn't)
PLAIN = {"mean": [0, 0, 0], "std": [1, 1, 1]}


def jpeg(color, size=(48, 32), noise_seed: int | None = None) -> bytes:
    pixels = np.full((size[1], size[0], 3), color, dtype=np.uint8)
    if noise_seed is not None:  # a little texture: the JPEG isn't one flat block
        rng = np.random.default_rng(noise_seed)
        pixels = np.clip(pixels.astype(int) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """200 small coloured JPEGs in nested folders, 3 broken files, and a file that isn't an image type."""
    folder = tmp_path_factory.mktemp("photos")
    rng = random.Random(19)
    for i in range(IMAGES):
        path = folder / f"set{i % 4}" / f"img{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpeg(tuple(rng.randrange(256) for _ in range(3)), noise_seed=i))
    for name, data in BROKEN.items():
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data if data is not None else jpeg((10, 200, 30), size=(640, 480), noise_seed=1)[:2000])
    (folder / "notes.txt").write_text("not taken: not an image extension")
    return folder


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model's checkpoint and a config serving it with ONNX Runtime where runtime auto picks it,
    as the server would (classify, 3 classes)."""
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = folder / "tiny.pth"
    torch.save(tiny_net().state_dict(), checkpoint)
    config = write_config(folder, [tiny_model_config(checkpoint, runtime="auto", max_batch_size=8)],
                          onnx_cache_dir=str(folder / "onnx"))
    return checkpoint, config


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_records(config: Path, paths: list[str], params: dict | None = None) -> list[dict]:
    """What PredictionService.predict answers for each file, one Call each (the server's path)."""
    service = PredictionService.load(load_config(config, env={}))
    try:
        records = []
        for path in paths:
            data = Path(path).read_bytes()
            try:
                answer = service.predict(Call(lambda _s, data=data: Inputs([data]), params=params or {}))
            except ServeError as exc:  # the decoding errors a broken file gets, recorded by batch
                records.append({"path": path, "error": {"code": exc.code, "message": exc.message}})
                continue
            records.append({"path": path, "answer": answer.results()[0].to_dict()})
        return records
    finally:
        service.close()


def test_folder_answers_as_the_service_in_input_order_with_errors_recorded(photos, tiny_setup, tmp_path, capsys):
    _, config = tiny_setup
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(photos), "--config", str(config), "--output", str(out), "--topk", "2"]) == 0
    summary = capsys.readouterr().err
    assert f"{IMAGES + 3} images (3 failed)" in summary and "images/s" in summary
    got = lines(out)
    paths = sorted(str(p) for p in photos.rglob("*") if p.suffix in (".jpg", ".png"))
    assert [g["path"] for g in got] == paths  # sorted, recursive, notes.txt left out
    assert got == expected_records(config, paths, {"topk": "2"})
    errors = {Path(g["path"]).relative_to(photos).as_posix(): g["error"]["code"] for g in got if "error" in g}
    assert errors == {name: "invalid_image" for name in BROKEN}
    first = next(g for g in got if "answer" in g)
    assert first["answer"]["model"] == "tiny" and len(first["answer"]["predictions"]) == 2
    assert {p["label"] for g in got if "answer" in g for p in g["answer"]["predictions"]} <= set(LABELS)


def test_the_server_answers_the_same(photos, tiny_setup, tmp_path):
    """Posting the same files to the app (the HTTP door) gives the lines' answers."""
    _, config = tiny_setup
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(photos / "set1"), "--config", str(config), "--output", str(out)]) == 0
    app = create_app(load_config(config, env={}))
    try:
        client = app.test_client()
        for line in lines(out)[:20]:
            posted = client.post("/predictions/tiny", data=Path(line["path"]).read_bytes(), content_type="image/jpeg")
            assert posted.status_code == 200 and posted.json == line["answer"]
    finally:
        app.extensions["serve"].close()


def test_killed_with_sigkill_then_resumed_writes_every_image_exactly_once(photos, tiny_setup, tmp_path):
    _, config = tiny_setup
    out = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "serve", "batch", str(photos), "--config", str(config), "--output", str(out),
               "--in-flight", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 5):  # running: answers are being written
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no answers within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    data = out.read_bytes()
    assert data.endswith(b"\n")  # whole lines only: each is one write()
    written = len(lines(out))
    assert 5 <= written < IMAGES + 3, "killed after the end: the test proved nothing"
    with out.open("ab") as f:  # what a crash of the machine could leave: a torn last line
        f.write(b'{"path": "torn')
    result = subprocess.run([*command[:-2], "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "already there" in result.stderr
    got = lines(out)
    paths = sorted(str(p) for p in photos.rglob("*") if p.suffix in (".jpg", ".png"))
    assert [g["path"] for g in got] == paths  # every image once, in input order
    assert got == expected_records(config, paths)


def test_shards_split_the_sorted_inputs(photos, tiny_setup, tmp_path):
    _, config = tiny_setup
    parts = []
    for index in range(3):
        out = tmp_path / f"part-{index}.jsonl"
        assert main(["batch", str(photos), "--config", str(config), "--output", str(out), "--shard", f"{index}/3"]) == 0
        parts.append([g["path"] for g in lines(out)])
    paths = sorted(str(p) for p in photos.rglob("*") if p.suffix in (".jpg", ".png"))
    assert parts == [paths[i::3] for i in range(3)]


def test_list_file_keeps_its_order_and_glob_matches(photos, tiny_setup, tmp_path):
    _, config = tiny_setup
    listed = [f"set2/img{i:03d}.jpg" for i in (90, 2, 50)]
    (photos / "list.txt").write_text("# three photos, not sorted\n" + "\n".join(listed) + "\n\n")
    try:
        out = tmp_path / "list.jsonl"
        assert main(["batch", str(photos / "list.txt"), "--config", str(config), "--output", str(out)]) == 0
        assert [g["path"] for g in lines(out)] == [str(photos / p) for p in listed]
    finally:
        (photos / "list.txt").unlink()
    out = tmp_path / "glob.jsonl"
    assert main(["batch", str(photos / "**" / "img00*.jpg"), "--config", str(config), "--output", str(out)]) == 0
    assert [g["path"] for g in lines(out)] == sorted(str(p) for p in photos.rglob("img00*.jpg"))  # 10, sorted


def test_csv_for_classify(photos, tiny_setup, tmp_path):
    _, config = tiny_setup
    out = tmp_path / "top1.csv"
    assert main(["batch", str(photos / "broken"), "--config", str(config), "--output", str(out)]) == 0
    assert main(["batch", str(photos / "set0"), "--config", str(config), "--output", str(out), "--topk", "1",
                 "--overwrite"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "error", "label_1", "index_1", "probability_1"]
    expected = expected_records(config, [r["path"] for r in rows], {"topk": "1"})
    for row, record in zip(rows, expected, strict=True):
        top = record["answer"]["predictions"][0]
        assert (row["label_1"], int(row["index_1"]), float(row["probability_1"])) == (
            top["label"], top["index"], top["probability"])


def test_segment_masks_go_to_png_files_and_embeddings_to_npy(tmp_path):
    segmenter = tmp_path / "segmenter.pth"
    torch.save(BrightSegmenter().state_dict(), segmenter)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_net().state_dict(), checkpoint)
    config = write_config(tmp_path, [
        {"name": "regions", "task": "segment", "runtime": "eager", "architecture": "models.bright:BrightSegmenter",
         "checkpoint": str(segmenter), "device": "cpu", "labels": ["dark", "bright"],
         "preprocess": {"resize": 64, "crop": 64, **PLAIN}},
        {**tiny_model_config(checkpoint), "name": "colours", "task": "embed"},
    ])
    images = tmp_path / "in"
    images.mkdir()
    half = np.zeros((40, 60, 3), dtype=np.uint8)
    half[:, 30:] = 255  # the right half is bright
    Image.fromarray(half).save(images / "half.png")
    (images / "bad.png").write_bytes(b"nope")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(images / "blue.png")

    out = tmp_path / "out" / "regions.jsonl"
    assert main(["batch", str(images), "--config", str(config), "--model", "regions", "--output", str(out)]) == 0
    got = lines(out)
    assert [Path(g["path"]).name for g in got] == ["bad.png", "blue.png", "half.png"]
    mask_info = got[2]["answer"]["mask"]
    assert "data" not in mask_info and (mask_info["width"], mask_info["height"]) == (60, 40)
    mask = np.asarray(Image.open(out.parent / mask_info["file"]))
    assert mask.shape == (40, 60) and (mask[:, 30:] == 1).all() and (mask[:, :30] == 0).all()
    assert {c["label"] for c in got[2]["answer"]["classes"]} == {"dark", "bright"}

    out = tmp_path / "out" / "colours.jsonl"
    assert main(["batch", str(images), "--config", str(config), "--model", "colours", "--output", str(out)]) == 0
    got = lines(out)
    matrix = np.load(out.with_suffix(".npy"))
    assert matrix.shape == (3, 3) and np.isnan(matrix[0]).all()  # bad.png's row
    assert np.allclose(matrix[1:], [got[1]["answer"]["embedding"], got[2]["answer"]["embedding"]])
    assert np.allclose(matrix[1], torch.tensor([0, 0, 1.0]) * 2 + 1)  # the tiny net's logits for blue


def test_a_checkpoint_with_inspects_defaults(tiny_setup, photos, tmp_path, capsys):
    checkpoint, config = tiny_setup
    out = tmp_path / "ckpt.jsonl"
    assert main(["batch", str(photos / "set3"), "--checkpoint", str(checkpoint), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the file doesn't say its architecture" in err and "give --architecture" in err
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    assert main(["batch", str(photos / "set3"), "--checkpoint", str(checkpoint), "--architecture", "models.tiny:TinyNet",
                 "--kwargs", '{"num_classes": 3}', "--labels", str(labels), "--output", str(out)]) == 0
    # inspect --config's preprocess (ImageNet's resize 256 / crop 224, mean, std) differs from the config's:
    # the answers are the tiny net's for that preprocessing, with the labels given.
    assert {p["label"] for g in lines(out) for p in g["answer"]["predictions"]} <= set(LABELS)
    assert len(lines(out)) == IMAGES // 4


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/3"], "--shard must be INDEX/COUNT with 0 <= INDEX < COUNT"),
    (["--shard", "x"], "--shard must be INDEX/COUNT"),
    (["--topk", "9"], "topk"),
    (["--architecture", "resnet18"], "--architecture go with --checkpoint"),
    (["--in-flight", "0"], "--in-flight must be at least 1"),
])
def test_bad_arguments_say_what_is_wrong(photos, tiny_setup, tmp_path, capsys, args, message):
    _, config = tiny_setup
    out = tmp_path / "x.jsonl"
    assert main(["batch", str(photos / "set0"), "--config", str(config), "--output", str(out), *args]) == 1
    assert message in capsys.readouterr().err


def test_inputs_and_outputs_that_are_refused(photos, tiny_setup, tmp_path, capsys):
    _, config = tiny_setup
    out = tmp_path / "x.jsonl"
    for source, message in [(tmp_path / "missing", "no such folder or list file, and not a glob"),
                            (photos / "set0" / "img000.jpg", "is an image: give its folder"),
                            (str(tmp_path / "*.gif"), "matches no file")]:
        assert main(["batch", str(source), "--config", str(config), "--output", str(out)]) == 1
        assert message in capsys.readouterr().err
    out.write_text('{"path": "a"}\n')
    assert main(["batch", str(photos / "set0"), "--config", str(config), "--output", str(out)]) == 1
    assert "exists: --resume continues it, --overwrite starts it again" in capsys.readouterr().err
    out.write_text("path,error\n")
    assert main(["batch", str(photos / "set0"), "--config", str(config), "--output", str(out), "--resume"]) == 1
    assert "is not a batch record" in capsys.readouterr().err


def test_csv_is_for_classify(tmp_path, capsys):
    segmenter = tmp_path / "segmenter.pth"
    torch.save(BrightSegmenter().state_dict(), segmenter)
    config = write_config(tmp_path, [{"name": "regions", "task": "segment", "runtime": "eager",
                                      "architecture": "models.bright:BrightSegmenter", "checkpoint": str(segmenter),
                                      "device": "cpu", "preprocess": {"resize": 64, "crop": 64, **PLAIN}}])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["batch", str(tmp_path), "--config", str(config), "--output", str(tmp_path / "o.csv")]) == 1
    assert "--format csv is for models answering ranked classes (predictions); this model's task is 'segment'" in capsys.readouterr().err


def test_shard_selection_is_deterministic():
    paths = [f"p{i}" for i in (5, 1, 4, 2, 3, 0)]
    assert select_shard(paths, Shard.parse("1/2")) == ["p5", "p1", "p3"]  # sorted positions 1, 3, 5; input order
    assert sorted(select_shard(paths, Shard(0, 2)) + select_shard(paths, Shard(1, 2))) == sorted(paths)
    with pytest.raises(InvalidRequestError):
        Shard.parse("2/2")


def test_collect_inputs_by_extension(photos):
    assert collect_inputs(photos, ["png"]) == [str(photos / "broken" / "text.png")]


def test_the_indexed_job_runs_one_shard_per_index_into_its_own_part():
    """deploy/k8s/batch/batch-job.yaml: its command parses as this CLI's batch, and COUNT in --shard is
    the Job's completions, so the indexes 0..COUNT-1 take every input once."""
    import yaml

    from serve.cli import build_parser

    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "batch" / "batch-job.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "serve"]
    outputs, shards = set(), []
    for index in range(spec["completions"]):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["command"][3:]]
        args = build_parser().parse_args(argv)
        assert args.command == "batch" and args.resume  # a retried pod continues its part
        shards.append(Shard.parse(args.shard))
        outputs.add(args.output)
    assert shards == [Shard(i, spec["completions"]) for i in range(spec["completions"])]
    assert len(outputs) == spec["completions"]  # a part file each
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert all(any(str(p).startswith(m) for m in mounts) for p in outputs)
