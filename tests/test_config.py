"""Config: one typed object from YAML + SERVE_* overrides; errors name the model and the field."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_model_config

from serve.config import DEFAULT_CONFIG_PATH, build_config, load_config
from serve.errors import ConfigError


def test_defaults_fill_in(tiny_checkpoint):
    config = build_config({"models": [{"name": "m", "architecture": "resnet18", "checkpoint": "w.pth"}]}, base_dir="/srv")
    spec = config.models[0]
    assert spec.checkpoint == Path("/srv/w.pth")
    assert (spec.device, spec.strict, spec.trust_pickle, spec.topk, spec.state_dict_key) == ("auto", True, False, 5, None)
    assert spec.preprocess.crop == 224 and spec.preprocess.mode == "RGB"
    assert config.server.host == "127.0.0.1" and config.server.port == 8000


def test_yaml_file_paths_are_relative_to_it(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    cfg = tmp_path / "conf" / "models.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "models:\n  - name: pets\n    architecture: models.tiny:TinyNet\n"
        "    checkpoint: ../w.pth\n    labels: ../labels.txt\n"
    )
    spec = load_config(cfg, env={}).models[0]
    assert spec.checkpoint == tmp_path / "w.pth"
    assert spec.labels == tmp_path / "labels.txt"


def test_environment_overrides(tiny_checkpoint):
    env = {"SERVE_DEVICE": "cuda:1", "PORT": "9001", "WEB_CONCURRENCY": "3", "SERVE_MAX_UPLOAD_BYTES": "1000"}
    config = build_config({"models": [tiny_model_config(tiny_checkpoint)]}, env=env)
    assert config.models[0].device == "cuda:1"
    assert (config.server.port, config.server.workers, config.server.max_upload_bytes) == (9001, 3, 1000)


def test_package_scheme_points_into_an_installed_package():
    config = build_config({"models": [{
        "name": "m", "architecture": "resnet18", "checkpoint": "package://serve/config.py",
    }]})
    assert config.models[0].checkpoint == Path(__file__).resolve().parent.parent / "serve" / "config.py"
    with pytest.raises(ConfigError, match="model 'm': field 'checkpoint': package 'no_such_pkg' is not installed"):
        build_config({"models": [{"name": "m", "architecture": "resnet18", "checkpoint": "package://no_such_pkg/w.pth"}]})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"topk": 0}, "model 'tiny': field 'topk': Input should be greater than 0 (got 0)"),
        ({"device": "gpu"}, "model 'tiny': field 'device': String should match pattern"),
        ({"strict": "maybe"}, "model 'tiny': field 'strict': Input should be a valid boolean"),
        ({"colour": "red"}, "model 'tiny': field 'colour': Extra inputs are not permitted"),
        ({"preprocess": {"resize": 100, "crop": 200}}, "model 'tiny': field 'preprocess': Value error, crop (200) must not exceed resize (100)"),
        ({"preprocess": {"mode": "L"}}, "mean needs 1 values for mode L"),
        ({"preprocess": {"mode": "CMYK"}}, "model 'tiny': field 'preprocess.mode'"),
        ({"sha256": "abc"}, "model 'tiny': field 'sha256'"),
    ],
)
def test_bad_model_fields_are_named(tiny_checkpoint, override, message):
    with pytest.raises(ConfigError) as err:
        build_config({"models": [tiny_model_config(tiny_checkpoint, **override)]})
    assert message in err.value.message


def test_a_bad_model_is_reported_once_and_alone(tiny_checkpoint):
    """Not followed by "models: Tuple should have at least 1 item", a side effect of dropping it."""
    with pytest.raises(ConfigError) as err:
        build_config({"models": [tiny_model_config(tiny_checkpoint, topk=0)]})
    assert err.value.message == "invalid config: model 'tiny': field 'topk': Input should be greater than 0 (got 0)"


def test_bad_name_without_a_name_uses_the_index():
    with pytest.raises(ConfigError, match=r"models\[0\]: field 'name': Field required"):
        build_config({"models": [{"architecture": "resnet18", "checkpoint": "w.pth"}]})
    with pytest.raises(ConfigError, match="model 'Has Spaces': field 'name': String should match pattern"):
        build_config({"models": [{"name": "Has Spaces", "architecture": "resnet18", "checkpoint": "w.pth"}]})


def test_duplicate_names_and_empty_lists_are_refused(tiny_checkpoint):
    spec = tiny_model_config(tiny_checkpoint)
    with pytest.raises(ConfigError, match=r"model names must be unique, repeated: \['tiny'\]"):
        build_config({"models": [spec, spec]})
    with pytest.raises(ConfigError, match="config: field 'models': Tuple should have at least 1 item"):
        build_config({"models": []})


def test_bad_server_setting_is_named(tiny_checkpoint):
    with pytest.raises(ConfigError, match="server: field 'port': Input should be a valid integer"):
        build_config({"models": [tiny_model_config(tiny_checkpoint)]}, env={"PORT": "eighty"})


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad, env={})
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad, env={})


def test_serve_config_env_chooses_the_file(tmp_path, tiny_checkpoint):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  - name: other\n    architecture: models.tiny:TinyNet\n    checkpoint: {tiny_checkpoint}\n")
    assert load_config(env={"SERVE_CONFIG": str(cfg)}).models[0].name == "other"


def test_default_config_is_valid():
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    spec = config.models[0]
    assert spec.name == "efficientnet_lite0"
    assert spec.checkpoint.is_file()
    assert config.model("efficientnet_lite0") is spec
