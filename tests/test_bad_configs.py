"""Hostile or broken configs, model folders and run folders, each run through the CLI: exit status 2 and one line
naming the file or config field and the problem, before any work and any write (no traceback, no run folder, no
output, no half-resumed run), and within seconds (aliases and huge networks are refused, not built)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from medsr.cli import main
from medsr.io import write_volume
from medsr.volume import Modality, Volume

BASE = {  # edsr_tiny on a 32 x 32 x 24 scan: trains 2 steps in about a second
    "model": {"name": "edsr_tiny"},
    "data": {
        "patch": [16],
        "batch_size": 2,
        "min_foreground": 0.0,
        "train_slices": [0, 12],
        "val_slices": [14, 18],
        "test_slices": [20, 24],
    },
    "train": {"steps": 2, "val_every": 2},
}


def write_scan(path, shape=(32, 32, 24)):
    """A smooth, structured NIfTI scan (a bright blob in a darker ellipsoid)."""
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    image = 100 * (radius < 0.9) + 80 * (radius < 0.4) + 10 * grid[0]
    write_volume(Volume(torch.from_numpy(image.astype(np.float32))[None], np.eye(4), Modality.MR), path)
    return path


def write_config(path, scan, **sections):
    """BASE with ``data.scans: [scan]``, each section updated by ``sections``."""
    config = {name: dict(values) for name, values in BASE.items()}
    config["data"]["scans"] = [str(scan)]
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def refused(argv, capsys, *fragments, seconds=5.0):
    """Run the CLI; assert exit status 2 and one stderr line naming each of ``fragments``, within ``seconds``."""
    start = time.monotonic()
    status = main([str(a) for a in argv])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medsr {argv[0]}: error: "), err
    assert len(lines[0]) < 600, lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert elapsed < seconds, f"{elapsed:.1f} s: {lines[0]}"
    return lines[0]


def snapshot(folder):
    """Every file under ``folder`` with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run folder and scan: the base config trained (so every case below differs from a working one)."""
    root = tmp_path_factory.mktemp("trained")
    scan = write_scan(root / "scan.nii.gz")
    run = root / "run"
    assert main(["train", str(write_config(root / "base.yaml", scan)), "--out", str(run)]) == 0
    assert (run / "last" / "training_state.pt").is_file() and (run / "best" / "model.json").is_file()
    lr = root / "lr.nii.gz"
    write_scan(lr, (16, 16, 4))
    return {"scan": scan, "run": run, "lr": lr}


# Training configs: refused before the run folder exists.

CONFIG_CASES = [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"steps": -1}}, "train.steps"),
    ({"train": {"val_every": 0}}, "train.val_every"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"train": {"lr": -1e-3}}, "train.lr"),
    ({"train": {"lr": 0.0}}, "train.lr"),
    ({"train": {"lr": 10**400}}, "train.lr"),  # an int beyond any float
    ({"train": {"threads": 10**6}}, "train.threads"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay"),
    ({"train": {"clip_grad_norm": -1.0}}, "train.clip_grad_norm"),
    ({"train": {"step_gamma": 0.0}}, "train.step_gamma"),
    ({"train": {"seed": -1}}, "train.seed"),
    ({"data": {"patch": [0]}}, "data.patch"),
    ({"data": {"min_foreground": 2.0}}, "data.min_foreground"),
    ({"data": {"val_slices": [18, 14]}}, "data.val_slices"),
    ({"data": {"slice_axes": [0, 3]}}, "data.slice_axes"),
    ({"data": {"slice_axes": [2, 2]}}, "data.slice_axes"),
    ({"data": {"slice_axes": []}}, "data.slice_axes"),
    ({"data": {"zooms": [0.2]}}, "data.zooms"),
    ({"data": {"blurs": [-1.0]}}, "data.blurs"),
    ({"data": {"blurs": []}}, "data.blurs"),
    ({"data": {"contrasts": -1}}, "data.contrasts"),
    ({"data": {"held_out_slice_axis": 1}}, "data.held_out_slice_axis"),  # the in-plane x2 model has no slices to thin
    ({"data": {"held_out_slice_axis": 3}, "degradation": {"factors": [1, 1, 2]}}, "data.held_out_slice_axis"),
    ({"degradation": {"factors": [float("nan"), 2, 1]}}, "degradation.factors"),
    ({"degradation": {"slice_thickness": float("inf")}}, "degradation.slice_thickness"),
    ({"model": {"scale": [0, 0]}}, "model.scale"),
    ({"model": {"spatial_dims": 4}}, "model.spatial_dims"),
    ({"model": {"name": "edsr_huge"}}, "model.name"),
    ({"model": {"kwargs": {"bogus": 1}}}, "bogus"),
    ({"model": {"kwargs": {"num_blocks": "two"}}}, "num_blocks"),
    ({"model": {"kwargs": {"num_blocks": 2.5}}}, "num_blocks"),
    ({"model": {"kwargs": {"num_blocks": 0}}}, "num_blocks"),
    ({"model": {"kwargs": {"num_blocks": True}}}, "num_blocks"),
    ({"model": {"kwargs": {"res_scale": float("nan")}}}, "res_scale"),
    ({"model": {"kwargs": {"num_blocks": 100_000_000}}}, "num_blocks"),  # refused, not built: gigabytes, minutes
    ({"model": {"kwargs": {"channels": 100_000_000}}}, "channels"),
    ({"model": {"kwargs": {"scale": [2, 2]}}}, "model.scale"),
    ({"gan": {"discriminator": "patchgan", "pretrain_steps": 1, "d_lr": float("nan")}}, "gan.d_lr"),
    ({"gan": {"discriminator": "patchgan", "pretrain_steps": 1, "discriminator_kwargs": {"bogus": 1}}}, "bogus"),
]


@pytest.mark.parametrize(
    ("sections", "field"), CONFIG_CASES, ids=[f"{i}-{field}" for i, (_, field) in enumerate(CONFIG_CASES)]
)
def test_bad_config_fields_are_refused_before_the_run_folder(tmp_path, capsys, sections, field):
    scan = write_scan(tmp_path / "scan.nii.gz")
    run = tmp_path / "run"
    refused(["train", write_config(tmp_path / "bad.yaml", scan, **sections), "--out", run], capsys, field)
    assert not run.exists()


def test_an_override_is_checked_like_the_file(tmp_path, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz")
    run = tmp_path / "run"
    config = write_config(tmp_path / "base.yaml", scan)
    refused(["train", config, "--set", "train.steps=-1", "--out", run], capsys, "train.steps", "-1")
    refused(["train", config, "--set", "train.lr=.nan", "--out", run], capsys, "train.lr")
    assert not run.exists()


@pytest.mark.parametrize(
    ("scans", "fragment"),
    [
        (["missing.nii.gz"], "missing.nii.gz"),
        (["corrupt.nii.gz"], "corrupt.nii.gz"),
        (["scan.nii.gz", "empty.nii.gz"], "empty.nii.gz"),
        ([], "data.scans"),
    ],
    ids=["missing", "corrupt", "empty", "none"],
)
def test_missing_or_corrupt_scans_leave_no_run_folder(tmp_path, capsys, scans, fragment):
    write_scan(tmp_path / "scan.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a NIfTI file")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    config = write_config(tmp_path / "bad.yaml", tmp_path / "scan.nii.gz")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["scans"] = [str(tmp_path / name) for name in scans]
    config.write_text(yaml.safe_dump(raw))
    refused(["train", config, "--out", tmp_path / "run"], capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_a_patch_larger_than_the_scan_leaves_no_run_folder(tmp_path, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz")
    config = write_config(tmp_path / "bad.yaml", scan, data={"patch": [4096]})
    refused(["train", config, "--out", tmp_path / "run"], capsys, "larger than")
    assert not (tmp_path / "run").exists()


def test_a_network_too_large_to_build_is_stopped_before_it_grows(tmp_path, capsys):
    """Each kwarg within bounds, together too many layers: the build stops early, before the run folder."""
    scan = write_scan(tmp_path / "scan.nii.gz")
    config = write_config(tmp_path / "bad.yaml", scan, model={"name": "rcan_tiny", "kwargs": {"num_groups": 4096}})
    refused(["train", config, "--out", tmp_path / "run"], capsys, "rcan_tiny", "too large", seconds=10)
    assert not (tmp_path / "run").exists()


def alias_bomb(levels: int = 12) -> str:
    """Billion laughs: each level an alias list of nine of the one before (9**12 values), inside a config field."""
    lines = ["card:", '  intended_use: &l0 "lol"']
    lines += [f"  limits{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    lines += [f"  limits: [*l{levels - 1}, *l{levels - 1}]"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (alias_bomb(), "aliases"),
        ("train:\n  steps: " + "1" * 5000 + "\n", "cannot read config"),  # past Python's int-parsing limit
        ("train: " + "[" * 50_000 + "\n", "cannot read config"),  # nesting deeper than the recursion limit
        ("train: [1, 2\n", "line 2"),  # malformed: one line with the place, not PyYAML's multi-line excerpt
        ("train: !!python/object:os.system {}\n", "cannot read config"),
        ("train: \xff\xfe\n", "cannot read config"),
        ("card:\n  intended_use: '" + "x" * 1_100_000 + "'\n", "larger than 1,000,000 bytes"),
        ("- 1\n- 2\n", "a config is a mapping"),
        ("train:\n  stepz: " + "9" * 300 + "\n", "stepz"),
    ],
    ids=["alias-bomb", "huge-int", "deep", "malformed", "python-tag", "bad-bytes", "over-1MB", "list", "unknown"],
)
def test_hostile_yaml_is_refused_quickly_in_one_line(tmp_path, capsys, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    refused(["train", config, "--out", tmp_path / "run"], capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_a_config_field_holding_a_huge_value_is_cut_in_the_message(tmp_path, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz")
    config = write_config(tmp_path / "bad.yaml", scan, train={"loss": ["l1"] * 20_000})
    line = refused(["train", config, "--out", tmp_path / "run"], capsys, "config.train.loss")
    assert len(line) < 300


# Resuming: a run folder whose checkpoint is broken or hostile is refused before anything in it changes.


class Payload:
    """Unpickling this runs a command: touch ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plain_pickle(path, marker):
    path.write_bytes(pickle.dumps(Payload(marker)))


def zipped_pickle(path, marker):
    torch.save({"step": 2, "optimizer": Payload(marker)}, path)


def nan_in_optimizer(path, marker):
    state = torch.load(path, weights_only=True)
    next(iter(state["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan"))
    torch.save(state, path)


@pytest.mark.parametrize(
    ("corrupt", "fragments"),
    [
        (plain_pickle, ["training_state.pt", "not a medsr checkpoint", "nothing was unpickled"]),
        (zipped_pickle, ["training_state.pt", "not a medsr checkpoint", "nothing of it was unpickled"]),
        (nan_in_optimizer, ["training_state.pt", "optimizer.state.0.exp_avg", "NaN or Inf"]),
        (lambda path, marker: path.write_bytes(b"PK\x03\x04 truncated"), ["training_state.pt"]),
        (lambda path, marker: torch.save({"step": 2}, path), ["training_state.pt", "not a medsr training state"]),
    ],
    ids=["plain-pickle", "zipped-pickle", "nan-optimizer", "truncated", "incomplete"],
)
def test_resume_refuses_a_broken_or_hostile_training_state(trained, tmp_path, capsys, corrupt, fragments):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    corrupt(run / "last" / "training_state.pt", tmp_path / "pwned")
    before = snapshot(run)
    refused(["train", "--resume", run], capsys, *fragments)
    assert not (tmp_path / "pwned").exists()  # nothing in the file was run
    assert snapshot(run) == before


def poison(path, value=float("nan"), name="body.0.body.0.weight"):
    """Set one tensor of a safetensors file to ``value`` (NaN or Inf)."""
    tensors = load_file(path)
    tensors[name][0].fill_(value)
    save_file(tensors, path)


def edit_json(path, change):
    description = json.loads(path.read_text())
    path.write_text(json.dumps(change(description)))


@pytest.mark.parametrize(
    ("corrupt", "fragments"),
    [
        (lambda run: poison(run / "last" / "model.safetensors"), ["model.safetensors", "body.0.body.0.weight", "NaN"]),
        (lambda run: (run / "metrics.jsonl").write_text("[1, 2]\n"), ["metrics.jsonl"]),
        (lambda run: (run / "last" / "model.json").write_text("[]"), ["model.json", "JSON object"]),
        (lambda run: edit_json(run / "last" / "model.json", lambda d: d | {"step": 3}), ["step"]),
        (lambda run: (run / "config.yaml").write_text("train:\n  steps: -1\n"), ["train.steps"]),
        (lambda run: (run / "config.yaml").unlink(), ["config.yaml", "cannot read config"]),
    ],
    ids=["nan-weights", "metrics", "description", "step", "config", "no-config"],
)
def test_resume_refuses_a_broken_run_folder_without_touching_it(trained, tmp_path, capsys, corrupt, fragments):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    corrupt(run)
    before = snapshot(run)
    refused(["train", "--resume", run], capsys, *fragments)
    assert snapshot(run) == before


# Model folders: upscale refuses them before writing any output.


def model_folder(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["run"] / "best", model)
    return model


def test_the_trained_model_folder_upscales(trained, tmp_path):
    """The control for the cases below: the unmodified folder works."""
    out = tmp_path / "sr.nii.gz"
    assert main(["upscale", str(trained["lr"]), str(out), "--model", str(model_folder(trained, tmp_path))]) == 0
    assert out.is_file()


def kwargs(**changes):
    return lambda d: d | {"model_kwargs": d["model_kwargs"] | changes}


MODEL_CASES = [
    (lambda m: (m / "model.json").write_text("[1, 2]"), ["model.json", "a JSON object, got a list"]),
    (lambda m: (m / "model.json").write_text("{"), ["model.json", "cannot read it"]),
    (lambda m: (m / "model.json").write_text('{"a": "' + "x" * 1_100_000 + '"}'), ["model.json", "1,000,000"]),
    (lambda m: (m / "model.json").write_text("[" * 100_000), ["model.json"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"model_name": 3}), ["model_name must be a JSON string"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"model_name": "edsr_huge"}), ["unknown model"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"model_kwargs": [1]}), ["model_kwargs"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"scale": "x"}), ["scale must be a JSON array"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"scale": [2, 0, 1]}), ["scale must be integers"]),
    (lambda m: edit_json(m / "model.json", lambda d: d | {"degradation": {"factors": 1}}), ["model.json"]),
    (lambda m: edit_json(m / "model.json", kwargs(bogus=1)), ["model.json", "bogus"]),
    (lambda m: edit_json(m / "model.json", kwargs(num_blocks="two")), ["model.json", "num_blocks"]),
    (lambda m: edit_json(m / "model.json", kwargs(channels=8.5)), ["model.json", "channels"]),
    (lambda m: edit_json(m / "model.json", kwargs(res_scale=float("nan"))), ["model.json", "res_scale"]),
    (lambda m: edit_json(m / "model.json", kwargs(res_scale=10**400)), ["model.json", "res_scale"]),
    (lambda m: edit_json(m / "model.json", kwargs(num_blocks=100_000_000)), ["model.json", "num_blocks"]),
    (lambda m: edit_json(m / "model.json", kwargs(num_blocks=4096)), ["model.json", "too large"]),
    (lambda m: edit_json(m / "model.json", kwargs(scale=[2, 2, 2])), ["model.json", "scale"]),
    (lambda m: edit_json(m / "model.json", kwargs(num_blocks=3)), ["model.safetensors", "missing: body.2"]),
    (lambda m: edit_json(m / "model.json", kwargs(channels=4)), ["model.safetensors", "shape"]),
    (lambda m: poison(m / "model.safetensors"), ["model.safetensors", "body.0.body.0.weight", "NaN or Inf"]),
    (lambda m: poison(m / "model.safetensors", float("inf"), "tail.bias"), ["model.safetensors", "tail.bias"]),
    (lambda m: (m / "model.safetensors").write_bytes(b"garbage"), ["model.safetensors", "broken checkpoint"]),
    (lambda m: (m / "model.safetensors").unlink(), ["model.safetensors"]),
]
MODEL_IDS = [
    "list",
    "invalid-json",
    "over-1MB",
    "deep",
    "name-type",
    "unknown-model",
    "kwargs-type",
    "scale-type",
    "scale-zero",
    "degradation",
    "unknown-kwarg",
    "str-kwarg",
    "float-kwarg",
    "nan-kwarg",
    "huge-float-kwarg",
    "1e8-blocks",
    "too-large",
    "scale-kwarg",
    "missing-tensor",
    "wrong-shape",
    "nan-weights",
    "inf-weights",
    "garbage-weights",
    "no-weights",
]


@pytest.mark.parametrize(("corrupt", "fragments"), MODEL_CASES, ids=MODEL_IDS)
def test_upscale_refuses_a_broken_or_hostile_model_folder(trained, tmp_path, capsys, corrupt, fragments):
    model = model_folder(trained, tmp_path)
    corrupt(model)
    out = tmp_path / "sr.nii.gz"
    refused(["upscale", trained["lr"], out, "--model", model], capsys, *fragments)
    assert not out.exists()
