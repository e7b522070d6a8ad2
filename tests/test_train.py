import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml

from medsr.checkpoint import load_checkpoint, save_checkpoint, shipped_models
from medsr.config import load_config, to_dict
from medsr.data import Pair, PairDataset, blurred
from medsr.degrade import Degradation
from medsr.models import create_model
from medsr.train import LOSSES, batches, check_config, fit, train_step
from medsr.volume import Volume

TINY = [
    "model.name=edsr_tiny",
    "data.patch=32",
    "data.batch_size=2",
    "data.train_slices=[60,70]",
    "data.val_slices=[75,77]",
    "train.steps=4",
    "train.val_every=2",
]


def test_train_step_updates_every_parameter():
    torch.manual_seed(0)
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2))
    before = [p.detach().clone() for p in model.parameters()]
    batch = Pair(lr=torch.rand(2, 1, 8, 8), hr=torch.rand(2, 1, 16, 16))
    logs = train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), batch, LOSSES["l1"])
    assert logs["loss"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.kernels
def test_gradient_clipping_and_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2))
    batch = Pair(lr=torch.rand(2, 1, 8, 8), hr=torch.rand(2, 1, 16, 16) * 10)  # far off: large gradients
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradients matter here
    logs = train_step(model, optimizer, batch, LOSSES["l1"], clip_grad_norm=0.1, bf16=True)
    assert logs["grad_norm"] > 0.1 and math.isfinite(logs["loss"])  # the norm before clipping
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(after) == pytest.approx(0.1, rel=1e-4)


def test_a_resumed_stream_replays_the_same_batches(rng):
    volume = Volume(torch.from_numpy(rng.random((1, 32, 32, 4), dtype=np.float32)), np.eye(4))
    dataset = PairDataset([volume], Degradation((2, 2, 1)), patch=16, length=5, min_foreground=0)
    from_start = list(itertools.islice(batches(dataset, 2, 0), 6))
    resumed = next(batches(dataset, 2, 4))
    assert torch.equal(resumed.hr, from_start[4].hr) and torch.equal(resumed.lr, from_start[4].lr)
    assert not torch.equal(from_start[0].hr, from_start[3].hr)  # epoch 1 (items 5..) differs from epoch 0


@pytest.mark.kernels
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2))
    save_checkpoint(
        tmp_path / "ckpt", model, {"model_name": "edsr_tiny", "model_kwargs": {"spatial_dims": 2, "scale": [2, 2]}}
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]
    loaded, description = load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(1, 1, 12, 10)
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)
    assert description["model_name"] == "edsr_tiny"


def test_broken_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path, create_model("edsr_tiny"), {})
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "model.json").write_text(json.dumps({"model_name": "edsr_tiny", "model_kwargs": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken checkpoint"):
        load_checkpoint(tmp_path)


def test_fit_on_colin27_writes_config_metrics_and_checkpoints(tmp_path):
    best = fit(load_config(overrides=TINY), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert best["psnr"] == max(row["psnr"] for row in rows)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["name"] == "edsr_tiny"
    model, description = load_checkpoint(tmp_path / "best")
    assert description["step"] == best["step"] and description["modality"] == "MR"
    assert description["config"]["data"]["train_slices"] == [60, 70]
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)


def test_fit_trains_a_2d_model_through_plane_and_records_its_inputs(tmp_path):
    """A 2D model of scale (1, 2) learns thick slices from (i, k) and (j, k) planes; validation runs it on both
    orientations of the slab (``predict_orthogonal_planes``). The checkpoint records its LR inputs."""
    overrides = [
        "model.scale=[1,2]",
        "degradation.factors=[1,1,2]",
        "degradation.slice_profile=gaussian",
        "data.patch=[24,8]",
        "data.val_slices=[75,79]",
        "train.steps=2",
    ]
    best = fit(load_config(overrides=[*TINY, *overrides]), tmp_path, progress=False)
    assert math.isfinite(best["psnr"]) and best["psnr_cubic"] > 25
    model, description = load_checkpoint(tmp_path / "best")
    assert model(torch.rand(1, 1, 6, 4)).shape == (1, 1, 6, 8)
    inputs = description["inputs"]  # Colin27 at 1 mm, slices 2x thicker; uint8 intensities
    assert inputs["spacing_mm"] == {"min": [1.0, 1.0, 2.0], "max": [1.0, 1.0, 2.0]}
    assert -5 < inputs["low"][0] <= inputs["low"][1] < 5 and 100 < inputs["high"][0] <= inputs["high"][1] <= 255


def test_region_split_along_j_for_2d_images(tmp_path):
    """A 2D image (one slice) is split by columns: ``data.split_axis: 1``; validation scores its own columns."""
    overrides = [
        "data.scans=[mr_shoulder]",
        "data.split_axis=1",
        "data.train_slices=[0,600]",
        "data.val_slices=[640,800]",
        "data.test_slices=[840,1024]",
        "train.steps=2",
    ]
    best = fit(load_config(overrides=[*TINY, *overrides]), tmp_path, progress=False)
    assert math.isfinite(best["psnr"]) and best["psnr_cubic"] > 25
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["data"]["split_axis"] == 1


def test_fit_trains_and_validates_a_3d_model_through_plane(tmp_path):
    """A 3D model learns a factor along k (thick slices): validation scores the HR slices of the whole slab."""
    overrides = [
        "model.spatial_dims=3",
        "model.scale=[1,1,2]",
        "degradation.factors=[1,1,2]",
        "degradation.slice_profile=gaussian",
        "data.patch=[24,24,8]",
        "data.val_slices=[75,79]",
        "train.steps=2",
    ]
    best = fit(load_config(overrides=[*TINY, *overrides]), tmp_path, progress=False)
    assert math.isfinite(best["psnr"]) and best["psnr_cubic"] > 25  # tricubic along k on the real slab
    model, description = load_checkpoint(tmp_path / "best")
    assert description["model_kwargs"] == {"spatial_dims": 3, "scale": [1, 1, 2]}
    assert model(torch.rand(1, 1, 6, 6, 4)).shape == (1, 1, 6, 6, 8)


def test_shipped_default_model_is_present():
    assert "edsr_mr_x2" in shipped_models()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.val_slices=[80,100]"], "overlap"),
        (["data.test_slices=[10,30]"], "overlap"),
        (["degradation.factors=[3,3,1]"], "model.scale"),
        (["degradation.factors=[1.5,1.5,1]"], "integer factors"),
        (["train.loss=l3"], "unknown loss"),
        (["train.optimizer=sgd"], "adam or adamw"),
        (["degradation.factors=[2,2,2]"], "through-plane"),
        (["degradation.factors=[1,1,4]"], "model.scale"),  # through-plane, but the model's scale is (2, 2)
        (["data.split_axis=3"], "split_axis"),
        (["model.spatial_dims=3", "model.scale=[2,2]"], "model.scale"),
        (["train.schedule=step"], "step_every"),
        (["train.ema_decay=1.0"], "ema_decay"),
        (["train.loss_terms={l1: 1.0, l3: 0.1}"], "unknown loss"),
        (["train.loss_terms={l1: 0}"], "weight"),
        (["data.gamma=[0,2]"], "data.gamma"),
        (["data.gamma=[2,1]"], "data.gamma"),
    ],
)
def test_configs_that_would_leak_or_fail_late_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_config(load_config(overrides=overrides))


def test_training_only_scans_and_gamma_copies_train_but_are_never_scored(tmp_path, capsys):
    """A whole scan in data.extra_train_scans is trained on (its LR range is in the model's inputs record) and
    refused by evaluate; gamma copies bend the training intensities; an extra scan that is also held out or
    validated is refused before any work."""
    from medsr.cli import main
    from medsr.io import read_volume, write_volume
    from medsr.samples import sample_path
    from medsr.train import _training_data

    colin = read_volume(sample_path("colin27"))
    extra = tmp_path / "other.nii.gz"
    write_volume(colin.replace(array=colin.array[:, 40:104, 60:124, 20:26] * 3.0), extra)  # another "subject"
    overrides = [*TINY, f"data.extra_train_scans=[{extra}]", "data.gamma=[0.5,2]", "train.steps=2"]
    config = load_config(overrides=overrides)
    data = _training_data(config)
    assert len(data.dataset.regions) == 2 * 5  # Colin27's training region and the whole extra scan, 5 gammas each
    assert data.dataset.regions[5].spatial_shape == (64, 64, 6)
    means = [float(region.array.mean()) for region in data.dataset.regions[:5]]  # normalised tissue < 1:
    assert means == sorted(means, reverse=True) and means[0] > 2 * means[4]  # gamma 0.5 brightens, 2 darkens
    fit(config, tmp_path / "run", progress=False)
    _, description = load_checkpoint(tmp_path / "run" / "best")
    colin_range, extra_range = description["inputs"]["scans"]  # the extra scan's intensities are 3x Colin27's
    assert extra_range[1] == pytest.approx(3 * read_volume(extra).array.div(3).quantile(0.999).item(), rel=0.05)
    assert extra_range[1] > colin_range[1]
    assert main(["evaluate", "--model", str(tmp_path / "run" / "best"), "--scan", str(extra)]) == 2
    assert "extra_train_scans" in capsys.readouterr().err
    with pytest.raises(ValueError, match="extra_train_scans"):
        _training_data(load_config(overrides=[*overrides, f"data.held_out_scans=[{extra}]"]))


def test_fit_with_a_weighted_loss(tmp_path):
    best = fit(
        load_config(overrides=[*TINY, "train.loss_terms={l1: 1.0, ssim: 0.1, gradient: 0.5}"]), tmp_path, progress=False
    )
    assert math.isfinite(best["psnr"])


def test_fit_refuses_to_mix_runs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="previous run"):
        fit(load_config(overrides=TINY), tmp_path, progress=False)


def test_split_by_scan_trains_on_a_folder_and_evaluate_refuses_its_training_scans(tmp_path, capsys):
    """Three real scans in a folder: one trains, one validates, one is held out for evaluate."""
    from medsr.cli import main
    from medsr.io import read_volume, write_volume
    from medsr.samples import sample_path
    from medsr.train import training_scans

    colin = read_volume(sample_path("colin27"))
    folder = tmp_path / "scans"
    folder.mkdir()
    for index, start in enumerate((40, 80, 120)):  # three distinct slabs stand in for three subjects
        write_volume(
            colin.replace(array=colin.array[:, 40:104, 60:124, start : start + 12]), folder / f"s{index}.nii.gz"
        )
    overrides = [o for o in TINY if "slices" not in o] + [f"data.scans=[{folder}]", "data.split=scan"]
    config = load_config(overrides=overrides)
    train, val, test = training_scans(config)
    assert len(train) == len(val) == len(test) == 1 and len({*train, *val, *test}) == 3
    fit(config, tmp_path / "run", progress=False)
    checkpoint = str(tmp_path / "run" / "best")
    assert main(["evaluate", "--model", checkpoint, "--scan", str(train[0])]) == 2
    assert "trained or was validated on" in capsys.readouterr().err
    assert main(["evaluate", "--model", checkpoint, "--scan", str(test[0])]) == 0
    assert "slab k 0..11" in capsys.readouterr().out
    # The split is saved with the model: a scan added to the folder later cannot reshuffle a training scan into test.
    write_volume(colin.replace(array=colin.array[:, 40:104, 60:124, 10:22]), folder / "s3.nii.gz")
    assert main(["evaluate", "--model", checkpoint, "--scan", str(train[0])]) == 2
    assert "trained or was validated on" in capsys.readouterr().err


@pytest.mark.kernels
def test_a_run_killed_mid_way_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """kill -9 a real `medsr train` process after its third checkpoint, resume it, compare with a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from medsr.cli import main

    engine = [
        "train.optimizer=adamw",
        "train.weight_decay=1e-4",
        "train.schedule=step",
        "train.step_every=200",
        "train.clip_grad_norm=0.5",
        "train.ema_decay=0.99",
        "train.bf16=true",
    ]  # all of it must resume
    overrides = [o for o in TINY if not o.startswith("train.")] + [
        "data.patch=16",
        "train.steps=600",
        "train.val_every=50",
        *engine,
    ]
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(load_config(overrides=overrides))))
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "medsr", "train", str(config_file), "--out", str(killed), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    steps_done = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 150 <= steps_done[-1] < 600, "the run must be killed mid-way for this test to mean anything"

    assert main(["train", "--resume", str(killed), "--device", "cpu"]) == 0
    fit(load_config(config_file), tmp_path / "clean", progress=False, device="cpu")
    resumed, clean = (
        load_file(killed / "last" / "model.safetensors"),
        load_file(tmp_path / "clean" / "last" / "model.safetensors"),
    )
    assert all(torch.equal(resumed[name], clean[name]) for name in clean)
    rows = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert rows == list(range(50, 601, 50))  # no row lost or written twice


def test_ddp_with_two_processes_follows_the_single_process_loss_curve(tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 4 = one process with batch 4: same losses, same weights."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    config = load_config(
        overrides=[o for o in TINY if not o.startswith("train.")]
        + ["data.batch_size=4", "train.steps=20", "train.val_every=10"]
    )
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "medsr", "train", str(config_file), "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    fit(config, tmp_path / "one", progress=False, device="cpu")

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("ddp") == pytest.approx(losses("one"), rel=1e-5)
    ddp, one = (load_file(tmp_path / run / "last" / "model.safetensors") for run in ("ddp", "one"))
    assert all(torch.allclose(ddp[name], one[name], atol=1e-6) for name in one)


def test_an_apple_gpu_under_torchrun_is_refused_before_any_work(tmp_path, monkeypatch):
    """DDP has no backend for MPS tensors: several processes on 'mps' stop with one line, before the run folder."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="device 'mps' under torchrun"):
        fit(load_config(overrides=TINY), tmp_path / "run", progress=False, device="mps")
    assert not (tmp_path / "run").exists()


def test_train_on_cuda_or_a_clear_error_without_one(tmp_path, capsys):
    """`medsr train --device cuda` trains on the GPU where torch has one (model, batches, validation; bf16 autocast
    where the GPU has it natively), and each validation row records the device; elsewhere it stops with one line
    saying so, before the run folder exists (and the CPU run records its device)."""
    from medsr.cli import main

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(load_config(overrides=[*TINY, "train.bf16=true"]))))
    run = tmp_path / "run"
    args = ["train", str(config_file), "--out", str(run), "--device", "cuda"]
    if not torch.cuda.is_available():
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "device 'cuda'" in lines[0] and "no CUDA GPU" in lines[0]
        assert not run.exists()
        fit(load_config(config_file), run, progress=False, device="cpu")
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert (row["device"], row["processes"], row["precision"]) == ("cpu", 1, "bf16")  # the CPU keeps train.bf16
        pytest.skip("no CUDA GPU here: checked the error and the CPU record; the GPU run needs a machine with one")
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert [(row["device"], row["precision"]) for row in rows] == [("cuda:0", precision)] * 2
    assert all(math.isfinite(row["loss"]) and row["psnr"] > row["psnr_cubic"] - 10 for row in rows)
    model, description = load_checkpoint(run / "best")  # saved from the GPU, loaded on the CPU
    assert description["scores"]["validation"]["device"] == "cuda:0"
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)


def test_slice_axes_train_a_through_plane_model_on_slices_thinned_along_every_axis():
    """data.slice_axes (0, 1, 2): each training region also turned so that i, then j, is the axis thinned out; the
    turned regions are the same voxels (Colin27's training slab)."""
    from medsr.train import _training_data

    through = [
        *TINY,
        "model.scale=[1,4]",
        "degradation.factors=[1,1,4]",
        "data.patch=[32,16]",
        "data.train_slices=[40,70]",
    ]
    data = _training_data(load_config(overrides=[*through, "data.slice_axes=[0,1,2]"]))
    slab = _training_data(load_config(overrides=through)).dataset.regions[0]
    assert slab.spatial_shape == (181, 217, 28)  # k 40..69, cut to a multiple of 4
    turned = [region.spatial_shape for region in data.dataset.regions]  # k cut to a multiple of 4 in each
    assert turned == [(30, 217, 180), (181, 30, 216), (181, 217, 28)]
    torch.testing.assert_close(data.dataset.regions[1].array[:, :, :28], slab.array.transpose(2, 3)[..., :216])
    assert all(data.dataset[index].hr.shape[-1] == 16 for index in range(4))


def test_slice_axes_train_an_in_plane_model_on_sagittal_coronal_and_axial_planes():
    """For an in-plane model data.slice_axes turns each region so that its (i, j) planes are sagittal, then coronal
    planes: a pair's LR is the k-space truncation of a coronal patch of Colin27's training slab."""
    from medsr.degrade.sampling import kspace_truncate
    from medsr.train import _training_data

    overrides = [*TINY, "data.train_slices=[40,72]", "data.patch=[16]", "degradation.kspace_window=rect"]
    data = _training_data(load_config(overrides=[*overrides, "data.slice_axes=[0,1,2]"]))
    slab = _training_data(load_config(overrides=overrides)).dataset.regions[0]  # (180, 216, 32): k 40..71
    assert [r.spatial_shape for r in data.dataset.regions] == [(32, 216, 180), (180, 32, 216), (180, 216, 32)]
    coronal = slab.array[0, :, 100, :]  # the (i, k) plane at j = 100
    torch.testing.assert_close(data.dataset.regions[1].array[0, :, :, 100], coronal)
    torch.testing.assert_close(data.dataset.lr[1][0, :, :, 100], kspace_truncate(coronal, (2, 2)))
    pair = data.dataset[0]
    assert pair.hr.shape[-2:] == (16, 16) and pair.lr.shape[-2:] == (8, 8)


def test_blurs_add_smoother_copies_of_each_intensity_copy():
    """data.blurs (0, 1.2): each gamma copy is followed by its Gaussian-blurred copy (blur after the intensity curve,
    as a scanner blurs the object it images): same voxels and mean, less detail, and a sigma-1.2 Gaussian's
    variance added to an edge's profile."""
    from medsr.train import _training_data

    overrides = [*TINY, "data.gamma=[0.5,2]", "data.blurs=[0,1.2]", "data.train_slices=[40,72]"]
    regions = _training_data(load_config(overrides=overrides)).dataset.regions
    assert len(regions) == 10
    for sharp, smooth in zip(regions[::2], regions[1::2], strict=True):
        assert smooth.spatial_shape == sharp.spatial_shape
        assert float(smooth.array.mean()) == pytest.approx(float(sharp.array.mean()), rel=1e-3)
        detail = [float(r.array.diff(dim=1).pow(2).mean()) for r in (sharp, smooth)]
        assert detail[1] < 0.5 * detail[0]
    step = torch.zeros(1, 64, 1, 1)
    step[:, 32:] = 1
    spread = torch.diff(blurred(Volume(step, torch.eye(4)), 1.2).array.flatten())  # the edge's profile
    centre = (spread * torch.arange(63)).sum()
    assert float((spread * (torch.arange(63) - centre) ** 2).sum()) == pytest.approx(1.2**2, rel=0.01)


def test_zooms_add_coarser_copies_of_each_training_region():
    from medsr.train import _training_data

    data = _training_data(load_config(overrides=[*TINY, "data.zooms=[1,2]", "data.train_slices=[40,72]"]))
    fine, coarse = data.dataset.regions
    assert fine.spatial_shape == (180, 216, 32) and coarse.spatial_shape == (90, 108, 16)  # cut to multiples of 2
    assert coarse.spacing == pytest.approx(tuple(2 * s for s in fine.spacing), rel=0.01)
    spacing = data.inputs["spacing_mm"]  # what upscale's spacing warning compares with: the LR voxels trained on
    assert spacing["min"][:2] == pytest.approx([2, 2], rel=0.01) and spacing["max"][:2] == pytest.approx(
        [4, 4], rel=0.02
    )


def test_contrasts_add_copies_with_random_intensity_curves_after_the_gammas():
    """data.contrasts 3: each training region is followed, after its gamma copies, by 3 copies whose intensities
    went through smooth random curves (seeded by train.seed): air stays dark, every voxel of one intensity gets one
    new intensity, in [0, 1], and tissues may swap brightness."""
    from medsr.train import _training_data

    overrides = [*TINY, "data.gamma=[0.5,2]", "data.contrasts=3", "data.train_slices=[40,72]"]
    regions = _training_data(load_config(overrides=overrides)).dataset.regions
    assert len(regions) == 5 + 3
    source = regions[2].array  # gamma 1: the region itself
    levels = source.unique()  # Colin27 is stored as 8-bit integers: few distinct intensities
    assert len(levels) < 300
    swapped = 0
    for copy in regions[5:]:
        assert copy.spatial_shape == regions[2].spatial_shape and float(copy.array.min()) >= 0
        assert float(copy.array.max()) <= 1 and float(copy.array[source == levels[0]].max()) < 0.2  # air: dark
        mapped = torch.stack([copy.array[source == level][0] for level in levels])
        assert all(
            torch.equal(copy.array[source == level].unique(), mapped[n : n + 1]) for n, level in enumerate(levels)
        )
        swapped += int((mapped.diff() < 0).any())
    assert swapped >= 1  # at least one curve is not monotonic
    again = _training_data(load_config(overrides=overrides)).dataset.regions
    assert all(torch.equal(a.array, b.array) for a, b in zip(regions[5:], again[5:], strict=True))
