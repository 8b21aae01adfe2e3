"""python -m serve inspect / check / predict, run as a user would."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import image_bytes, tiny_model_config, tiny_net, write_config
from servers import ROOT

from serve.cli import main


def test_inspect_general_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.tar"
    net = tiny_net()
    torch.save({"epoch": 5, "model_state_dict": net.state_dict(),
                "optimizer_state_dict": torch.optim.SGD(net.parameters(), lr=0.1).state_dict(), "loss": 0.5}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:  zip" in out
    assert "entries: epoch=5, model_state_dict=dict(2 entries, 2 tensors)" in out
    assert "layout:  dict entry 'model_state_dict'" in out
    assert "fc.weight" in out and "torch.Size([3, 3])" in out


def test_inspect_ambiguous_file_lists_each_state_dict(tmp_path, capsys):
    path = tmp_path / "two.tar"
    torch.save({"modelA_state_dict": tiny_net().state_dict(), "modelB_state_dict": tiny_net().state_dict()}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not decided: checkpoint holds several state_dicts" in out
    assert "[modelA_state_dict]" in out and "[modelB_state_dict]" in out
    assert main(["inspect", str(path), "--key", "modelB_state_dict"]) == 0
    assert "layout:  dict entry 'modelB_state_dict'" in capsys.readouterr().out


@pytest.mark.parametrize("content, kind", [(torch.zeros(3), "Tensor"), ([torch.zeros(2)], "list")])
def test_inspect_a_file_that_holds_no_dict(tmp_path, capsys, content, kind):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    assert main(["inspect", str(path)]) == 0
    assert f"layout:  not decided: checkpoint holds a {kind}, not a state_dict" in capsys.readouterr().out


def test_inspect_refuses_a_pickle_unless_trusted(tmp_path, capsys):
    path = tmp_path / "whole.pth"
    torch.save(tiny_net(), path)
    assert main(["inspect", str(path)]) == 1
    assert "holds pickled Python objects" in capsys.readouterr().err
    assert main(["inspect", str(path), "--trust-pickle"]) == 0
    assert "whole-model pickle (TinyNet)" in capsys.readouterr().out


def test_check_and_predict(tmp_path, tiny_checkpoint, capsys):
    config = write_config(tmp_path, [tiny_model_config(tiny_checkpoint)])
    assert main(["check", str(config)]) == 0
    assert ("tiny: ok, classify, 3 classes, models.tiny:TinyNet on cpu, runtime eager, bare state_dict"
            in capsys.readouterr().out)
    image = tmp_path / "blue.png"
    image.write_bytes(image_bytes((0, 0, 255)))
    assert main(["predict", str(image), "--config", str(config), "--topk", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["predictions"][0]["label"] == "blue" and len(answer["predictions"]) == 1


def test_check_reports_a_broken_model(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"")
    config = write_config(tmp_path, [tiny_model_config(bad)])
    assert main(["check", str(config)]) == 1
    assert "error: model 'tiny': checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_predicts_with_the_default_model(tmp_path, cat_jpeg):
    image = tmp_path / "cat.jpg"
    image.write_bytes(cat_jpeg)
    result = subprocess.run([sys.executable, "-m", "serve", "predict", str(image), "--topk", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cat" in json.loads(result.stdout)["predictions"][0]["label"]
