from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import pytest
import yaml

from medsr.checkpoint import shipped_models
from medsr.cli import main
from medsr.config import Config, DataConfig, TrainConfig, load_config, resolve_config, shipped_configs, to_dict
from medsr.train import check_config

CHECKOUT_CONFIGS = Path(__file__).parents[1] / "configs"  # a link to the package's src/medsr/configs


def write_yaml(tmp_path, data, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.train == TrainConfig()
    assert config.model.scale == (2, 2)
    assert config.degradation.factors == (2.0, 2.0, 1.0)


def test_file_overrides_some_keys(tmp_path):
    path = write_yaml(tmp_path, {"train": {"steps": 50, "lr": 1e-3}, "data": {"train_slices": [10, 30]}})
    config = load_config(path)
    assert config.train.steps == 50
    assert config.train.lr == 1e-3
    assert config.data.train_slices == (10, 30)
    # Untouched keys and sections keep their defaults.
    assert config.train.loss == TrainConfig().loss
    assert config.data.patch == DataConfig().patch
    assert config.model == Config().model


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_overrides_win_over_file(tmp_path):
    path = write_yaml(tmp_path, {"train": {"steps": 50, "loss": "l2"}})
    config = load_config(path, ["train.steps=10"])
    assert config.train.steps == 10
    assert config.train.loss == "l2"


@pytest.mark.parametrize(
    ("override", "section", "name", "expected", "kind"),
    [
        ("train.lr=5e-5", "train", "lr", 5e-05, float),  # PyYAML reads 5e-5 as a string
        ("train.lr=1", "train", "lr", 1.0, float),
        ("train.steps=10", "train", "steps", 10, int),
        ("train.steps=4.0", "train", "steps", 4, int),
        ("train.loss=l2", "train", "loss", "l2", str),
        ("model.scale=[2,2]", "model", "scale", (2, 2), tuple),
        ("model.scale=[2,2,2]", "model", "scale", (2, 2, 2), tuple),
        ("degradation.factors=[2,2,1]", "degradation", "factors", (2.0, 2.0, 1.0), tuple),
        ("data.scans=[a,b]", "data", "scans", ("a", "b"), tuple),
        ("model.kwargs={features: 8}", "model", "kwargs", {"features": 8}, dict),
    ],
)
def test_override_cast_by_type(override, section, name, expected, kind):
    value = getattr(getattr(load_config(overrides=[override]), section), name)
    assert value == expected
    assert type(value) is kind
    if kind is tuple:
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize(
    ("override", "key"),
    [("nosuch.lr=1", "nosuch"), ("train.nosuch=1", "nosuch"), ("model.kwargs.features=8", "kwargs.features")],
)
def test_unknown_key_raises(override, key):
    with pytest.raises(ValueError, match=rf"unknown keys.*'{re.escape(key)}'"):
        load_config(overrides=[override])


def test_unknown_key_in_file_raises(tmp_path):
    path = write_yaml(tmp_path, {"train": {"stepz": 10}})
    with pytest.raises(ValueError, match=r"unknown keys for TrainConfig: \['stepz'\]"):
        load_config(path)


@pytest.mark.parametrize("override", ["trainlr=1", "train.lr", "train=1"])
def test_malformed_override_raises(override):
    with pytest.raises(ValueError, match=rf"override {re.escape(repr(override))} is not of the form section.key=value"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=abc", "config.train.steps"),
        ("train.steps=2.5", "config.train.steps"),
        ("train.steps=[1]", "config.train.steps"),
        ("train.lr=abc", "config.train.lr"),
        ("model.kwargs=3", "config.model.kwargs"),
        ("model.scale=[2,x]", "config.model.scale"),
    ],
)
def test_wrong_type_raises_naming_field(override, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: cannot use"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override", ["data.train_slices=[1,2,3]", "data.train_slices=[1]", "degradation.factors=[2,2]"]
)
def test_tuple_of_wrong_length_raises(override):
    with pytest.raises(ValueError, match=r"expected \d values"):
        load_config(overrides=[override])


def test_section_not_a_mapping_raises(tmp_path):
    path = write_yaml(tmp_path, {"train": [1, 2]})
    with pytest.raises(ValueError, match=r"config.train: expected a mapping"):
        load_config(path)


def test_yaml_list_raises(tmp_path):
    path = write_yaml(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: a config is a mapping of sections, got list"):
        load_config(path)


def test_invalid_yaml_raises_naming_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read config"):
        load_config(path)


def test_missing_file_raises_naming_it(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read config"):
        load_config(path)


def test_to_dict_is_plain_data():
    data = to_dict(load_config())
    json.dumps(data)
    assert data["model"]["scale"] == [2, 2]
    assert data["degradation"]["factors"] == [2.0, 2.0, 1.0]
    assert data["data"]["scans"] == ["colin27"]
    assert set(data) == {"model", "data", "degradation", "train", "gan", "card"}


def test_yaml_round_trip(tmp_path):
    config = load_config(
        overrides=["train.lr=5e-5", "model.scale=[3,3]", "model.kwargs={features: 8}", "data.scans=[a,b]"]
    )
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config


# Regressions of bugs found in review


def test_unparsable_override_value_raises_value_error():
    with pytest.raises(ValueError, match=r"train\.loss"):
        load_config(overrides=["train.loss=["])


@pytest.mark.parametrize(
    ("override", "field"),
    [("train.steps=true", "train.steps"), ("train.lr=false", "train.lr"), ("data.modality=null", "data.modality")],
)
def test_wrong_scalar_type_raises(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        load_config(overrides=[override])


@pytest.mark.parametrize("text", ["train:\n", "train: 5\n"])
def test_override_into_non_mapping_section_raises_value_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"train"):
        load_config(path, ["train.lr=1"])


# The shipped training configs: package data, loadable by name outside a checkout


def test_checkout_configs_folder_is_the_packaged_one():
    packaged = Path(str(importlib.resources.files("medsr").joinpath("configs")))
    assert CHECKOUT_CONFIGS.resolve() == packaged.resolve()
    assert shipped_configs() == sorted(p.stem for p in CHECKOUT_CONFIGS.glob("*.yaml"))
    assert set(shipped_models()) <= set(shipped_configs())  # every shipped model can be retrained by name


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_loads_by_name_and_passes_the_training_checks(tmp_path, monkeypatch, name):
    from_file = load_config(CHECKOUT_CONFIGS / f"{name}.yaml")
    check_config(from_file)
    monkeypatch.chdir(tmp_path)  # outside a checkout: no configs/ folder here
    for given in (name, f"{name}.yaml", f"configs/{name}.yaml"):
        assert load_config(given) == from_file, given
    assert load_config(name, ["train.steps=7"]).train.steps == 7


def test_a_file_of_a_shipped_name_wins_over_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path, {"train": {"steps": 7}}, "edsr_mr_x2.yaml")
    (tmp_path / "edsr_mr_x4").mkdir()  # a folder (e.g. a run's) does not hide the config of its name
    assert resolve_config("edsr_mr_x2.yaml") == Path("edsr_mr_x2.yaml")
    assert load_config("edsr_mr_x2.yaml").train.steps == 7
    assert resolve_config("edsr_mr_x4").parent.name == "configs"


@pytest.mark.parametrize("given", ["edsr_mr_x3", "nosuch.yaml", "configs/nosuch.yaml", "elsewhere/edsr_mr_x2.yaml"])
def test_unknown_config_name_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        load_config(given)
    message = str(error.value)
    assert message.startswith(f"{Path(given)}: cannot read config (no such file") and "\n" not in message
    assert all(name in message for name in shipped_configs())


def test_train_command_names_the_shipped_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "nosuch"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsr train: error: nosuch: cannot read config"), lines
    assert "edsr_mr_x2" in lines[0]
    assert not (tmp_path / "runs").exists()
