"""Every shipped model: reproducible from its config, scored on held-out data, and working on a small real input."""

from pathlib import Path

import pytest

from medsr.checkpoint import SHIPPED_DIR, load_checkpoint, shipped_models
from medsr.config import config_from_dict, load_config, to_dict
from medsr.data import crop_to_multiple, prepare_scan, slice_range
from medsr.degrade import degrade
from medsr.evaluation import best_baseline, compare_methods
from medsr.infer import model_predictor
from medsr.inputs import input_warnings
from medsr.intensity import volume_range
from medsr.io import read_volume
from medsr.samples import resolve_scan
from medsr.volume import crop, swap_into_k
from medsr.zoo import is_through_plane

SHIPPED = shipped_models()
CONFIGS = Path(__file__).parents[1] / "configs"
CROP = 96  # in-plane edge of the HR crop each model is run on


def test_every_modality_and_task_of_the_issue_is_shipped():
    tasks = {(load_checkpoint(name)[1]["modality"], tuple(load_checkpoint(name)[1]["scale"])) for name in SHIPPED}
    assert {("MR", (2, 2, 1)), ("MR", (4, 4, 1)), ("MR", (1, 1, 4)), ("CT", (2, 2, 1)), ("US", (2, 2, 1))} <= tasks
    assert ("CR", (2, 2, 1)) in tasks and any(m == "CT" and is_through_plane(s) for m, s in tasks)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_described_and_reproducible(name):
    _, description = load_checkpoint(name)
    assert (SHIPPED_DIR / name / "model.safetensors").stat().st_size < 5e6  # a few MB at most
    assert (SHIPPED_DIR / name / "MODEL_CARD.md").read_text().startswith(f"# Model card: {name}")
    assert {"spacing_mm", "low", "high"} <= set(description["inputs"])
    # The config in configs/ is the one the model was trained with (so `medsr train` reproduces it).
    assert to_dict(load_config(CONFIGS / f"{name}.yaml")) == to_dict(config_from_dict(description["config"]))
    held_out = description["scores"]["held_out"]
    assert held_out
    for entry in held_out:  # the numbers in the card and the table: better than the best baseline on every set
        psnr = {row["method"]: row["psnr"] for row in entry["rows"]}
        assert psnr[name] > best_baseline(entry["rows"])[1], entry["data"]


@pytest.mark.parametrize("name", SHIPPED)
def test_held_out_data_raises_no_intensity_warning(name):
    """The model's own held-out scans, degraded as in training, lie inside its intensity record; but nibabel's
    `anatomical.nii`, a 33x41 crop with tissue at every edge: with no background its window starts above 0 (+0.14
    of its width), unlike any training scan, and the warning says so rightly."""
    _, description = load_checkpoint(name)
    config = config_from_dict(description["config"])
    for entry in description["scores"]["held_out"]:
        volume = swap_into_k(
            read_volume(resolve_scan(entry["scan"]), modality=description["modality"]), entry["slice_axis"]
        )
        if entry["slices"]:
            volume = slice_range(volume, slices=tuple(entry["slices"]), axis=config.data.split_axis)
        lr = degrade(crop_to_multiple(volume, scale=description["scale"]), config.degradation)
        warnings = input_warnings(
            description["inputs"],
            modality=description["modality"],
            spacing=lr.spacing,
            scale=description["scale"],
            intensities=volume_range(lr),
        )
        flagged = [w for w in warnings if "intensit" in w]
        assert bool(flagged) == (entry["scan"] == "mr_anatomical"), (entry["data"], warnings)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_runs_on_a_small_real_input_and_beats_bicubic(name):
    """A crop of the model's held-out region of real data, degraded as in training, then super-resolved."""
    model, description = load_checkpoint(name)
    config = config_from_dict(description["config"])
    data = config.data
    volume = read_volume(resolve_scan(data.scans[0]), modality=description["modality"])
    region = slice_range(volume, slices=data.test_slices, axis=data.split_axis)
    shape = region.spatial_shape
    # k-space truncation is global (a crop's LR would wrap around its edges): MR models get whole planes.
    edge = max(shape) if description["modality"] == "MR" and not is_through_plane(description["scale"]) else CROP
    size = [min(edge, shape[0]), min(edge, shape[1]), shape[2] if is_through_plane(description["scale"]) else 1]
    start = [(n - s) // 2 for n, s in zip(shape, size, strict=True)]
    small = crop(region, start, [a + s for a, s in zip(start, size, strict=True)])
    hr = prepare_scan(small, config.degradation)
    comparison = compare_methods(
        hr,
        config.degradation,
        {name: model_predictor(model, precision="fp32")},
        slices=(0, hr.spatial_shape[2]),
        spatial_dims=config.model.spatial_dims,
    )
    sr = comparison.images[name]
    assert sr.shape == comparison.images["hr"].shape and sr.isfinite().all()
    psnr = {row["method"]: row["psnr"] for row in comparison.rows}
    assert psnr[name] > psnr["cubic"]
