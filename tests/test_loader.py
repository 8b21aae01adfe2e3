"""Every checkpoint layout the seed article describes is made here, then loaded or refused by the loader."""
from __future__ import annotations

import logging
import pickle
from unittest import mock

import pytest
import torch
from conftest import tiny_model_config, tiny_net
from torch import nn

from models.seed_fcn import MyModel
from models.tiny import TinyNet
from serve.config import build_config
from serve.errors import CheckpointError, ConfigError, DeviceError
from serve.formats.state_dict import build_module, find_state_dict, read_checkpoint
from serve.loader import load_model, resolve_device


def spec_for(checkpoint, **overrides):
    return build_config({"models": [tiny_model_config(checkpoint, **overrides)]}).models[0]


def assert_tiny_weights(module: nn.Module):
    assert torch.equal(module.fc.weight, torch.eye(3) * 2)
    assert torch.equal(module.fc.bias, torch.ones(3))


def load(path, **overrides):
    return load_model(spec_for(path, **overrides))


def test_bare_state_dict_loads_in_eval_mode_on_cpu(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny_net().state_dict(), path)
    loaded = load(path)
    assert_tiny_weights(loaded.module)
    assert not loaded.module.training
    assert loaded.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    assert loaded.layout == "bare state_dict"
    assert len(loaded.sha256) == 64


def test_eval_mode_switches_off_dropout(tmp_path):
    net = TinyNet(num_classes=3, dropout=0.9)
    net.load_state_dict(tiny_net().state_dict())  # non-zero weights: dropout would change the output
    path = tmp_path / "dropout.pth"
    torch.save(net.state_dict(), path)
    loaded = load(path, kwargs={"num_classes": 3, "dropout": 0.9})
    x = torch.rand(4, 3, 8, 8)
    assert not loaded.module.training
    with torch.inference_mode():
        out = loaded.module(x)
        assert torch.equal(out, loaded.module(x))
        assert torch.allclose(out, x.mean((2, 3)) * 2 + 1)  # no unit dropped, none scaled up


def test_general_checkpoint_finds_model_state_dict(tmp_path):
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    path = tmp_path / "checkpoint.tar"
    torch.save(
        {"epoch": 7, "model_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "loss": 0.25},
        path,
    )
    loaded = load(path)
    assert_tiny_weights(loaded.module)
    assert loaded.layout == "dict entry 'model_state_dict'"


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_common_keys_are_found(tmp_path, key):
    path = tmp_path / "c.pth"
    torch.save({key: tiny_net().state_dict(), "meta": {"arch": "tiny"}}, path)
    assert load(path).layout == f"dict entry '{key}'"


def test_several_models_in_one_file_chosen_by_key(tmp_path):
    other = TinyNet(num_classes=3)
    path = tmp_path / "gan.tar"
    torch.save(
        {
            "modelA_state_dict": tiny_net().state_dict(),
            "modelB_state_dict": other.state_dict(),
            "optimizerA_state_dict": torch.optim.SGD(other.parameters(), lr=0.1).state_dict(),
        },
        path,
    )
    loaded = load(path, state_dict_key="modelA_state_dict")
    assert_tiny_weights(loaded.module)
    assert loaded.layout == "dict entry 'modelA_state_dict'"
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert "several state_dicts: ['modelA_state_dict', 'modelB_state_dict']" in err.value.message
    assert "set state_dict_key" in err.value.message
    with pytest.raises(CheckpointError, match="state_dict_key 'modelC_state_dict' not in checkpoint"):
        load(path, state_dict_key="modelC_state_dict")


def test_dataparallel_prefix_is_stripped(tmp_path):
    path = tmp_path / "dp.pth"
    state = nn.DataParallel(tiny_net()).state_dict()
    assert all(k.startswith("module.") for k in state)
    torch.save(state, path)
    assert_tiny_weights(load(path).module)


def test_torch_compile_prefix_is_stripped(tmp_path):
    path = tmp_path / "compiled.pth"
    state = torch.compile(tiny_net()).state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save({"model": state}, path)
    assert_tiny_weights(load(path).module)


def save_tagged(obj, path, tag):
    """torch.save as if every storage lived on `tag`: the file a GPU machine writes, made on a CPU."""
    with mock.patch("torch.serialization.location_tag", return_value=tag):
        torch.save(obj, path)


def test_checkpoint_saved_on_cuda1_loads_on_cpu(tmp_path):
    path = tmp_path / "gpu1.pth"
    save_tagged({"model_state_dict": tiny_net().state_dict(), "epoch": 3}, path, "cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really asks for a GPU
            torch.load(path, weights_only=True)
    loaded = load(path)
    assert_tiny_weights(loaded.module)
    assert next(loaded.module.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_saved_on_cpu_loads_on_gpu(tmp_path):
    path = tmp_path / "cpu.pth"
    torch.save(tiny_net().state_dict(), path)
    loaded = load(path, device="cuda:0")
    assert next(loaded.module.parameters()).device == torch.device("cuda:0")
    assert torch.equal(loaded.module.fc.weight.cpu(), torch.eye(3) * 2)


def test_legacy_format_loads_without_mmap(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(tiny_net().state_dict(), path, _use_new_zipfile_serialization=False)
    assert_tiny_weights(load(path).module)


def test_safetensors_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_net().state_dict(), path)
    assert_tiny_weights(load(path).module)


def test_whole_model_pickle_refused_by_default_and_loaded_when_trusted(tmp_path, caplog):
    path = tmp_path / "whole.pth"
    torch.save(tiny_net(), path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert "holds pickled Python objects" in err.value.message
    assert "trust_pickle: true" in err.value.message
    with caplog.at_level(logging.WARNING, logger="serve.loader"):
        loaded = load(path, trust_pickle=True)
    assert "trust_pickle is set" in caplog.text
    assert_tiny_weights(loaded.module)
    assert not loaded.module.training
    pickled_only = load(path, trust_pickle=True, architecture=None)
    assert isinstance(pickled_only.module, TinyNet)
    assert pickled_only.layout == "whole-model pickle (TinyNet)"


class Exploit:
    """Unpickling this writes a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_net().state_dict(), "payload": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load(path)
    assert not marker.exists()


def test_shape_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "ten.pth"
    torch.save(TinyNet(num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = err.value.message
    assert message.startswith("model 'tiny': checkpoint does not fit the architecture")
    assert "2 shape mismatches: fc.weight (checkpoint [10, 3], model [3, 3]), fc.bias (checkpoint [10], model [3])" in message


def test_missing_and_unexpected_keys_are_counted_and_named(tmp_path):
    state = tiny_net().state_dict()
    state.pop("fc.bias")
    state.update({f"head.{i}.weight": torch.zeros(1) for i in range(7)})
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = err.value.message
    assert "1 missing keys: fc.bias" in message
    assert "7 unexpected keys: head.0.weight, head.1.weight, head.2.weight, head.3.weight, head.4.weight, ... (2 more)" in message


def test_warm_start_with_strict_false_loads_what_fits(tmp_path, caplog):
    source = MyModel()
    path = tmp_path / "seed.pth"
    state = source.state_dict()
    state.pop("fully_conv.14.weight")
    state["fully_conv.14.bias"] = torch.zeros(5)  # a head of another size
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    spec = dict(architecture="models.seed_fcn:MyModel", kwargs={}, labels=None, strict=False,
                preprocess={"resize": 64, "crop": 64})
    with caplog.at_level(logging.WARNING, logger="serve.loader"):
        loaded = load(path, **spec)
    assert torch.equal(loaded.module.fully_conv[0].weight, source.fully_conv[0].weight)
    assert set(loaded.skipped_keys) == {"extra.weight", "fully_conv.14.bias"}
    assert "non-strict load skipped" in caplog.text and "fully_conv.14.weight" in caplog.text
    with pytest.raises(CheckpointError, match="missing keys: fully_conv.14.weight"):
        load(path, **{**spec, "strict": True})


@pytest.mark.parametrize(
    "content, needle",
    [(b"", r"is empty \(0 bytes\)"), (b"not a checkpoint at all", "corrupt or truncated")],
)
def test_empty_and_garbage_files_are_refused(tmp_path, content, needle):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        load(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_refused(tmp_path, legacy):
    path = tmp_path / "cut.pth"
    torch.save(MyModel().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere.pth")


def test_sha256_mismatch_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="sha256 is .*config expects 0000"):
        load(tiny_checkpoint, sha256="0" * 64)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError) as err:
        resolve_device(f"cuda:{count + 2}")
    assert err.value.message == f"device 'cuda:{count + 2}' not available (found {count} CUDA device{'' if count == 1 else 's'})"


def test_unavailable_gpu_stops_the_load(tiny_checkpoint):
    with pytest.raises(DeviceError, match="model 'tiny': device 'cuda:7' not available"):
        load(tiny_checkpoint, device="cuda:7")


def test_torchvision_builder_and_import_path_architectures(tmp_path):
    resnet = build_module("resnet18", {"num_classes": 4})
    assert resnet.fc.out_features == 4
    assert isinstance(build_module("models.seed_fcn:MyModel", {}), MyModel)
    assert isinstance(build_module("torch.nn:Identity", {}), nn.Identity)


@pytest.mark.parametrize(
    "architecture, kwargs, needle",
    [
        ("no_such_net", {}, "neither 'package.module:Name' nor a torchvision model name"),
        ("models.nowhere:Net", {}, "cannot import 'models.nowhere'"),
        ("models.tiny:Missing", {}, "'models.tiny' has no attribute 'Missing'"),
        ("models.tiny:TinyNet", {"colour": 1}, "calling 'models.tiny:TinyNet' with kwargs {'colour': 1} failed"),
        ("math:pi", {}, "is not callable"),
        ("collections:OrderedDict", {}, "returned OrderedDict, not a torch.nn.Module"),
    ],
)
def test_bad_architecture_is_a_config_error(architecture, kwargs, needle):
    with pytest.raises(ConfigError, match="model 'x': field 'architecture'") as err:
        build_module(architecture, kwargs, "x")
    assert needle in err.value.message


def test_find_state_dict_unwraps_pickled_dataparallel():
    module, layout = find_state_dict(nn.DataParallel(tiny_net()))
    assert isinstance(module, TinyNet) and layout == "whole-model pickle (TinyNet)"


def test_non_mapping_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="holds a list"):
        find_state_dict([1, 2, 3])
    with pytest.raises(CheckpointError, match="no state_dict found in checkpoint; its keys: \\['epoch', 'loss'\\]"):
        find_state_dict({"epoch": 1, "loss": 0.5})


def test_loading_never_moves_pickle_flag_across_models(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(tiny_net(), whole)
    config = build_config({"models": [
        tiny_model_config(whole, name="trusted", trust_pickle=True),
        tiny_model_config(whole, name="untrusted"),
    ]})
    load_model(config.models[0])
    with pytest.raises(CheckpointError, match="model 'untrusted'"):
        load_model(config.models[1])


def test_pickle_error_is_not_mistaken_for_corruption(tmp_path):
    path = tmp_path / "p.pth"
    path.write_bytes(pickle.dumps({"a": Exploit(tmp_path / "x")}))
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        load(path)
    assert not (tmp_path / "x").exists()


def test_channels_last_answers_like_contiguous_and_half_is_ignored_on_cpu(tmp_path):
    from serve.memory import PixelBudget
    from serve.predictor import Predictor

    path = tmp_path / "seed.pth"
    torch.save(MyModel().state_dict(), path)
    spec = dict(architecture="models.seed_fcn:MyModel", kwargs={}, labels=None, preprocess={"resize": 64, "crop": 64},
                classify={"spatial_average": True})
    x = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    plain = spec_for(path, **spec)
    nhwc = spec_for(path, channels_last=True, half=True, **spec)
    loaded = load_model(nhwc)
    assert loaded.module.fully_conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded.module.fully_conv[0].weight.dtype == torch.float32
    expected = Predictor(plain, load_model(plain), None, PixelBudget(10**8)).predict_batch([x])[0]
    assert torch.allclose(Predictor(nhwc, loaded, None, PixelBudget(10**8)).predict_batch([x])[0], expected, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_on_gpu_answers_like_float32(tmp_path):
    from serve.memory import PixelBudget
    from serve.predictor import Predictor

    path = tmp_path / "seed.pth"
    torch.save(MyModel().state_dict(), path)
    spec = dict(architecture="models.seed_fcn:MyModel", kwargs={}, labels=None, preprocess={"resize": 64, "crop": 64},
                classify={"spatial_average": True})
    x = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    probs = []
    for half in (False, True):
        s = spec_for(path, device="cuda", half=half, channels_last=half, **spec)
        probs.append(Predictor(s, load_model(s), None, PixelBudget(10**8)).predict_batch([x])[0])
    assert torch.allclose(probs[0], probs[1], atol=1e-2)
