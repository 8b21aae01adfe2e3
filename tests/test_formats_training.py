"""Training checkpoints as their tools write them (timm's CheckpointSaver, Lightning's Trainer, a
hand-written loop with numpy metrics), served through the real app and compared with the same
weights in-process; and pickles that would run code, refused without running it."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import pathlib

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import tiny_model_config, tiny_net
from formats_helpers import LABELS, assert_same_answer, photo, served, timm_probs
from timm.data import resolve_data_config

from serve.cli import main
from serve.config import build_config
from serve.errors import CheckpointError, ConfigError
from serve.formats.state_dict import read_checkpoint
from serve.loader import load_model

ARCH = "test_resnet"  # timm's tiny test ResNet: 160 px input, crop_pct 0.95, mean/std 0.5


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Non-square: a small JPEG, a portrait PNG, and a JPEG large enough for reduced-scale decoding."""
    return [photo((451, 300), "JPEG"), photo((300, 451), "PNG"), photo((1400, 900), "JPEG")]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """A timm train.py checkpoint written by timm's CheckpointSaver: state_dict, state_dict_ema (ModelEmaV3),
    optimizer, args (argparse.Namespace), metric (np.float64)."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    folder = tmp_path_factory.mktemp("timm_run")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.5)
    train_step(model, optimizer)
    ema.update(model)  # decay 0.5: half the old weights, half the new
    args = argparse.Namespace(model=ARCH, num_classes=10, lr=0.5, img_size=None, crop_pct=None, mean=None, std=None)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=np.float64(0.25))
    return folder / "model_best.pth.tar", model.eval(), ema.module.eval()


def entry_from_inspect(path, capsys, **overrides) -> dict:
    """The models.yaml entry `python -m serve inspect FILE --config` prints, with its placeholders filled."""
    assert main(["inspect", str(path), "--config"]) == 0
    entry = yaml.safe_load(capsys.readouterr().out)[0]
    return {**entry, "labels": LABELS, "device": "cpu", **overrides}


def test_timm_checkpoint_serves_raw_and_ema_weights_without_trusting_pickle(timm_run, photos, capsys):
    path, model, ema_model = timm_run
    entry = entry_from_inspect(path, capsys)
    assert entry["architecture"] == f"timm:{ARCH}" and entry["kwargs"] == {"num_classes": 10}
    assert entry["preprocess"]["exact"] and "trust_pickle" not in entry
    data_config = resolve_data_config(model=model)
    for answer, data in zip(served(entry, photos), photos):
        assert_same_answer(answer, timm_probs(model, data_config, data))
    ema_answers = served({**entry, "name": "ema", "weights": "ema"}, photos)
    for answer, data in zip(ema_answers, photos):
        assert_same_answer(answer, timm_probs(ema_model, data_config, data))
    raw, ema = timm_probs(model, data_config, photos[0]), timm_probs(ema_model, data_config, photos[0])
    assert (raw - ema).abs().max() > 1e-3  # the EMA entry really holds other weights


def test_timm_checkpoint_is_inspected_with_its_ema_entry(timm_run, capsys):
    path = timm_run[0]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "args=Namespace(model='test_resnet'" in out and "metric=np.float64(0.25)" in out
    assert "layout:  dict entry 'state_dict' (EMA weights in 'state_dict_ema' too" in out
    assert "ema:     'state_dict_ema' holds EMA weights" in out


def test_model_ema_v2_checkpoint_loads_its_ema(tmp_path):
    from timm.utils import CheckpointSaver, ModelEmaV2

    model = timm.create_model(ARCH, pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEmaV2(model, decay=0.5)
    train_step(model, optimizer)
    ema.update(model)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model=ARCH), model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    spec = build_config({"models": [{"name": "v2", "architecture": f"timm:{ARCH}", "kwargs": {"num_classes": 10},
                                     "checkpoint": str(tmp_path / "model_best.pth.tar"), "weights": "ema",
                                     "device": "cpu", "preprocess": {"resize": 168, "crop": 160}}]}).models[0]
    loaded = load_model(spec)
    assert loaded.layout == "dict entry 'state_dict_ema' (EMA weights)"
    for key, value in ema.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)


def test_general_checkpoint_with_numpy_metrics_loads(tmp_path, photos):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=10).eval()
    path = tmp_path / "best.pth"
    torch.save({"epoch": np.int64(12), "model_state_dict": model.state_dict(), "best_acc": np.float64(0.93),
                "history": np.array([[0.5, 0.7], [0.8, 0.93]]), "flags": np.array([True, False]),
                "big_endian": np.array([1, 2], dtype=">i4"), "seen": frozenset({"a"}),
                "out_dir": pathlib.PosixPath("/runs/7"), "saved_at": datetime.datetime(2026, 1, 2, 3, 4)}, path)
    obj = read_checkpoint(path)
    assert obj["best_acc"] == np.float64(0.93) and type(obj["best_acc"]) is np.float64
    assert obj["epoch"] == 12 and obj["history"].array.tolist() == [[0.5, 0.7], [0.8, 0.93]]
    assert obj["big_endian"].array.tolist() == [1, 2] and obj["flags"].array.tolist() == [True, False]
    assert obj["out_dir"] == pathlib.PosixPath("/runs/7") and obj["saved_at"].year == 2026
    entry = {"name": "general", "architecture": f"timm:{ARCH}", "kwargs": {"num_classes": 10}, "checkpoint": str(path),
             "device": "cpu", "preprocess": {"resize": 168, "crop": 160, "mean": [0.5] * 3, "std": [0.5] * 3,
                                             "exact": True}}
    data_config = resolve_data_config(model=model)
    assert served(entry, photos[:1])[0]["predictions"][0]["index"] == timm_probs(model, data_config, photos[0]).argmax()


class Exploit:
    """Unpickling this writes a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@dataclasses.dataclass
class TrainConfig:
    """Plain data a training script might save: allowed only when a config lists it."""

    lr: float = 0.1
    epochs: int = 3


@pytest.mark.parametrize("payload, named", [
    (lambda marker: Exploit(marker), "io.open"),
    (lambda marker: SystemCall(f"touch {marker}"), "posix.system"),
    (lambda marker: argparse.Namespace(cfg=Exploit(marker)), "io.open"),  # hidden inside an allowed object
])
def test_code_in_a_checkpoint_never_runs(tmp_path, payload, named):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_net().state_dict(), "args": argparse.Namespace(lr=0.1),
                "metric": np.float64(0.5), "extra": payload(marker)}, path)
    with pytest.raises(CheckpointError, match=f"holds pickled Python objects \\('{named}'\\)"):
        load_model(build_config({"models": [tiny_model_config(path, safe_globals=[f"{__name__}:TrainConfig"])]}).models[0])
    assert not marker.exists()


def test_numpy_state_that_could_corrupt_memory_is_refused(tmp_path):
    """numpy's own dtype.__setstate__ would take this flags word (object pointers in a float64); ours
    refuses it, and object arrays, without building anything."""

    class Flagged:
        def __reduce__(self):
            return (np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 0x1F))

    path = tmp_path / "flags.pth"
    torch.save({"state_dict": tiny_net().state_dict(), "dtype": Flagged()}, path)
    with pytest.raises(CheckpointError, match="numpy data this server does not unpickle: numpy dtype state"):
        read_checkpoint(path)
    torch.save({"state_dict": tiny_net().state_dict(), "objects": np.array([{"a": 1}], dtype=object)}, path)
    with pytest.raises(CheckpointError, match="numpy dtype 'O8' is not a plain number type"):
        read_checkpoint(path)


def test_a_listed_data_class_loads_and_an_unlisted_one_is_named(tmp_path):
    path = tmp_path / "cfg.pth"
    torch.save({"state_dict": tiny_net().state_dict(), "config": TrainConfig()}, path)
    with pytest.raises(CheckpointError, match=f"add '{__name__}:TrainConfig' to this model's safe_globals"):
        load_model(build_config({"models": [tiny_model_config(path)]}).models[0])
    spec = build_config({"models": [tiny_model_config(path, safe_globals=[f"{__name__}:TrainConfig"])]}).models[0]
    assert load_model(spec).layout == "dict entry 'state_dict'"


@pytest.mark.parametrize("name, needle", [
    ("os:PathLike", "module 'os' can run code or reach the system; never allowed"),
    ("builtins:eval", "module 'builtins' can run code"),
    ("argparse:ArgumentParser.parse_args", "not a class"),
    ("no_such_module_x:Thing", "cannot import 'no_such_module_x'"),
    ("argparse.Namespace", "is not 'package.module:Class'"),
])
def test_bad_safe_globals_entries_are_config_errors(tmp_path, tiny_checkpoint, name, needle):
    with pytest.raises(ConfigError, match=needle):
        load_model(build_config({"models": [tiny_model_config(tiny_checkpoint, safe_globals=[name])]}).models[0])


# ---------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """One optimizer step of a real Lightning Trainer on the CPU, then trainer.save_checkpoint."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self, model_name: str = ARCH, num_classes: int = 10, args=None, extra_buffer: bool = False):
            super().__init__()
            self.save_hyperparameters()
            self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
            if extra_buffer:  # a loss weight the LightningModule keeps beside the network
                self.register_buffer("class_weight", torch.ones(num_classes))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    folder = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])), batch_size=4)
    runs = {}
    for name, hparams in (("plain", {"args": argparse.Namespace(epochs=1)}), ("buffer", {"extra_buffer": True}),
                          ("evil", {"args": Exploit(folder / "pwned")})):
        module = Classifier(**hparams)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)
        trainer.fit(module, data)
        trainer.save_checkpoint(folder / f"{name}.ckpt")
        runs[name] = (folder / f"{name}.ckpt", module.model.eval())
    # save_hyperparameters deep-copies its arguments, which calls Exploit's __reduce__ in this
    # (the training) process: the marker is removed so that only a load could bring it back.
    (folder / "pwned").unlink()
    return runs


@pytest.mark.slow
def test_lightning_checkpoint_serves_with_its_prefix_stripped(lightning_run, photos, capsys, caplog):
    path, model = lightning_run["plain"]
    entry = entry_from_inspect(path, capsys)
    assert entry["architecture"] == f"timm:{ARCH}"  # from hyper_parameters' model_name
    with caplog.at_level(logging.INFO, logger="serve.loader"):
        answers = served(entry, photos)
    assert "every checkpoint key starts with 'model.'" in caplog.text
    data_config = resolve_data_config(model=model)
    for answer, data in zip(answers, photos):
        assert_same_answer(answer, timm_probs(model, data_config, data))
    spec = build_config({"models": [entry]}).models[0]
    assert load_model(spec).layout == "dict entry 'state_dict', prefix 'model.' stripped"


@pytest.mark.slow
def test_lightning_module_with_other_keys_needs_strip_prefix(lightning_run):
    path, model = lightning_run["buffer"]
    entry = {"name": "buffer", "architecture": f"timm:{ARCH}", "kwargs": {"num_classes": 10}, "checkpoint": str(path),
             "device": "cpu", "preprocess": {"resize": 168, "crop": 160}}
    with pytest.raises(CheckpointError, match="set strip_prefix: 'model.' \\(1 other keys are then ignored\\)"):
        load_model(build_config({"models": [entry]}).models[0])
    loaded = load_model(build_config({"models": [{**entry, "strip_prefix": "model."}]}).models[0])
    assert loaded.layout == "dict entry 'state_dict', prefix 'model.' stripped (1 other keys ignored)"
    assert torch.equal(loaded.module.fc.weight, model.fc.weight)


@pytest.mark.slow
def test_lightning_hyper_parameters_holding_code_are_refused(lightning_run):
    path, _ = lightning_run["evil"]
    with pytest.raises(CheckpointError, match="this is a Lightning checkpoint: such objects usually sit in hyper_parameters"):
        read_checkpoint(path)
    assert not (path.parent / "pwned").exists()
