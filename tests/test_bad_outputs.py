"""Hostile options and failing writes: one-line errors, nothing half-written, no debris, no hang."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import medsr
import medsr.report
import medsr.train
from medsr.cli import main
from medsr.io import TEMP_MARK

from .test_gan import CONFIG, TINY_GAN


@pytest.fixture
def scan(tmp_path):
    """A small MR-like NIfTI in its own folder, and an empty output folder."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    rng = np.random.default_rng(0)
    path = tmp_path / "in" / "scan.nii.gz"
    volume = medsr.Volume(torch.from_numpy(rng.random((1, 24, 20, 8), dtype=np.float32)) * 100, np.eye(4))
    medsr.write_volume(volume, path)
    return path


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of the CLI, usage errors (SystemExit) included."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--scale", "inf,2,1"], ["--scale", "finite"]),
        (["--scale", "0,0,1"], ["scale", "(0, 16]"]),
        (["--scale", "1e9,1e9,1"], ["scale", "(0, 16]"]),
        (["--spacing", "0,0,1"], ["spacing", "(0, 16]"]),
        (["--overlap", "-3"], ["--overlap", ">= 0"]),
        (["--tile", "0"], ["--tile", ">= 1"]),
        (["--precision", "fp16"], ["--precision", "fp16"]),
        (["--scale", "2,2,1", "--spacing", "1,1,1"], ["scale or spacing"]),
    ],
)
def test_bad_upscale_options_are_one_line_and_write_nothing(capsys, scan, options, words):
    code, err = run(capsys, ["upscale", str(scan), str(scan.parent.parent / "out" / "sr.nii.gz"), *options])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(word in err for word in words), err
    assert list((scan.parent.parent / "out").iterdir()) == []


def test_simulate_refuses_factors_that_leave_nothing(capsys, scan):
    out = scan.parent.parent / "out" / "lr.nii.gz"
    code, err = run(capsys, ["simulate", str(scan), str(out), "--modality", "MR", "--factors", "1e9,1e9,1"])
    assert code == 2 and "factors must be 3 numbers in [1, 16]" in err and str(scan) in err
    assert not out.exists()


def test_selfsr_refuses_an_absurd_slice_thickness_at_once(capsys, tmp_path):
    volume = medsr.Volume(torch.rand(1, 16, 16, 8), np.diag([1.0, 1.0, 4.0, 1.0]), medsr.Modality.MR)
    medsr.write_volume(volume, tmp_path / "thick.nii.gz")
    start = time.monotonic()
    code, err = run(
        capsys, ["selfsr", str(tmp_path / "thick.nii.gz"), str(tmp_path / "out.nii"), "--slice-thickness", "1e9"]
    )
    assert code == 2 and "more than 8x the slice spacing" in err and time.monotonic() - start < 30
    assert not (tmp_path / "out.nii").exists()


def test_a_model_that_outputs_nan_writes_nothing(capsys, scan, monkeypatch):
    model = medsr.load_model("edsr_mr_x2")
    with torch.no_grad():
        next(model.network.parameters()).fill_(float("nan"))  # in memory only: a broken network
    out = scan.parent.parent / "out" / "sr.nii.gz"
    with pytest.raises(ValueError, match="NaN or infinite"):
        medsr.upscale_file(scan, out, model)  # streamed
    with pytest.raises(ValueError, match="NaN or infinite"):
        medsr.upscale_file(scan, out, model, scale=(1.5, 1.5, 1))  # in memory
    assert list(out.parent.iterdir()) == []


def test_models_table_into_a_folder_leaves_no_debris(capsys, tmp_path):
    (tmp_path / "table").mkdir()
    code, err = run(capsys, ["models", "--table", str(tmp_path / "table")])
    assert code == 2 and str(tmp_path / "table") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"] and not list((tmp_path / "table").iterdir())


def test_evaluate_out_is_refused_when_it_exists_and_left_absent_when_the_disk_fills(capsys, tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    code, err = run(capsys, ["evaluate", "--slices", "120:122", "--out", str(tmp_path / "old")])
    assert code == 2 and "exists; pass --force" in err and (tmp_path / "old" / "keep.txt").read_text() == "mine"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medsr.report, "error_map_figure", disk_full)
    code, err = run(capsys, ["evaluate", "--slices", "120:122", "--precision", "fp32", "--out", str(tmp_path / "new")])
    assert code == 2 and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_train_that_fails_before_its_first_checkpoint_leaves_no_run_folder(capsys, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medsr.train, "save_checkpoint", disk_full)
    overrides = [o for o in TINY_GAN if not o.startswith(("gan.", "train.steps", "train.val_every"))]
    config = CONFIG.parent / "edsr_mr_x2.yaml"
    argv = ["train", str(config), "--out", str(tmp_path / "run"), "--set", *overrides, "train.steps=2"]
    code, err = run(capsys, [*argv, "train.val_every=2"])
    assert code == 2 and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_while_a_dicom_series_is_written_leaves_no_folder(capsys, tmp_path, monkeypatch):
    """The audit's traceback: `medsr upscale` into a DICOM series on a full disk. Now one line, nothing left."""
    import pydicom

    written = []

    def save_as(self, filename, *args, **kwargs):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        written.append(filename)
        return original(self, filename, *args, **kwargs)

    original = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", save_as)
    volume = medsr.Volume(torch.rand(1, 24, 20, 6) * 100, np.eye(4), medsr.Modality.MR)
    medsr.write_volume(volume, tmp_path / "scan.nii.gz")
    code, err = run(capsys, ["upscale", str(tmp_path / "scan.nii.gz"), str(tmp_path / "series"), "--precision", "fp32"])
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest: input warnings, progress
    assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_an_existing_sidecar_is_replaced_only_with_force(capsys, scan):
    out = scan.parent.parent / "out" / "sr.nii.gz"
    sidecar = out.with_name("sr.json")
    sidecar.write_text("notes of someone else")
    code, err = run(capsys, ["upscale", str(scan), str(out), "--precision", "fp32"])
    assert code == 2 and f"{sidecar}: exists; pass --force" in err
    assert (
        sorted(p.name for p in out.parent.iterdir()) == ["sr.json"] and sidecar.read_text() == "notes of someone else"
    )
    code, err = run(capsys, ["upscale", str(scan), str(out), "--precision", "fp32", "--force"])
    assert code == 0 and json.loads(sidecar.read_text())["Model"] == "edsr_mr_x2" and out.exists()


def test_sigterm_while_an_output_and_its_sidecar_are_staged_leaves_the_old_pair(tmp_path):
    """`kill -TERM` of `medsr upscale --force` once the sidecar and the image are both staged beside their
    targets: the previous image and sidecar stay byte for byte, and no temporary file is left."""
    volume = medsr.Volume(torch.rand(1, 160, 160, 64) * 100, np.eye(4), medsr.Modality.MR)
    medsr.write_volume(volume, tmp_path / "lr.nii")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sr.nii").write_bytes(b"old image")
    (out / "sr.json").write_text("old sidecar")
    command = [sys.executable, "-m", "medsr", "upscale", str(tmp_path / "lr.nii"), str(out / "sr.nii"), "--force"]
    process = subprocess.Popen([*command, "--precision", "fp32"], stderr=subprocess.DEVNULL)
    staged, deadline = [], time.monotonic() + 120
    while len(staged) < 2 and process.poll() is None and time.monotonic() < deadline:
        staged = sorted(p.name.split(TEMP_MARK)[1] for p in out.iterdir() if TEMP_MARK in p.name)
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM and staged == ["sr.json", "sr.nii"]
    assert sorted(p.name for p in out.iterdir()) == ["sr.json", "sr.nii"]
    assert (out / "sr.nii").read_bytes() == b"old image" and (out / "sr.json").read_text() == "old sidecar"
