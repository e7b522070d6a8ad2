"""Per-scan adaptation (medsr.adapt, `medsr upscale --adapt`): fine-tuning on the scan's own LR -> LLR pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medsr
from medsr.adapt import adapt
from medsr.cli import main
from medsr.data import degrade_normalised, prepare_scan
from medsr.samples import sample_path


@pytest.fixture(scope="module")
def t1_slices() -> medsr.Volume:
    """Two coronal slices of a T1 head no shipped model trained on (ITK's Kmeans test scan), in scanner units."""
    scan = medsr.read_volume(sample_path("mr_kmeans_t1"), modality="MR")
    return scan.replace(array=scan.array[..., 28:32].contiguous())


def _pair_error(model: medsr.SRModel, scan: medsr.Volume) -> float:
    """L1 between the model's output from the scan's LLR and the scan itself: what adaptation minimises."""
    hr = prepare_scan(scan, model.degradation)
    llr = degrade_normalised(hr, model.degradation, rng=None)
    with torch.no_grad():
        output = model.network(llr.array.permute(3, 0, 1, 2))
    return float((output - hr.array.permute(3, 0, 1, 2)).abs().mean())


def test_adaptation_fits_the_scans_own_pairs_and_leaves_the_model_alone(t1_slices, monkeypatch):
    monkeypatch.setattr("medsr.adapt.MIN_GAIN", -np.inf)  # kept whatever the held-out check says
    model = medsr.load_model("edsr_mr_x2")
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    adapted = adapt(model, t1_slices, max_steps=40).model
    assert adapted.name == "edsr_mr_x2+adapted" and adapted.path == model.path
    assert _pair_error(adapted, t1_slices) < 0.97 * _pair_error(model, t1_slices)
    assert all(torch.equal(before[k], v) for k, v in model.network.state_dict().items())
    again = adapt(model, t1_slices, max_steps=40).model  # steps, not seconds, decide: reproducible
    for a, b in zip(adapted.network.parameters(), again.network.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_adaptation_that_does_not_help_the_held_out_part_is_not_kept(t1_slices, monkeypatch, caplog):
    """The last quarter of the slices is kept out of the fine-tuning; the model itself comes back when the adapted
    one does not predict that part better (here: a gain that can never be reached)."""
    monkeypatch.setattr("medsr.adapt.MIN_GAIN", np.inf)
    model = medsr.load_model("edsr_mr_x2")
    with caplog.at_level("INFO", logger="medsr"):
        result = adapt(model, t1_slices, max_steps=2)
    assert result.model is model and not result.kept and result.steps == 2
    assert result.error_after > 0 and result.error_before > 0
    assert "adaptation not kept" in caplog.text


def test_a_scan_too_small_to_adapt_on_is_refused():
    tiny = medsr.Volume(torch.rand(1, 12, 12, 1) * 100, np.eye(4), medsr.Modality.MR)
    with pytest.raises(ValueError, match="too few to adapt on"):
        adapt(medsr.load_model("edsr_mr_x2"), tiny, max_steps=1)


def test_upscale_and_evaluate_with_adapt(t1_slices, tmp_path, capsys):
    """`medsr upscale --adapt 1` writes the scan with the adapted model (named in the sidecar); `medsr evaluate
    --adapt 1` scores the adapted model beside the plain one, with its time."""
    source = tmp_path / "t1.nii.gz"
    medsr.write_volume(t1_slices, source)
    assert main(["upscale", str(source), str(tmp_path / "sr.nii.gz"), "--adapt", "1"]) == 0
    sidecar = json.loads((tmp_path / "sr.json").read_text())
    assert sidecar["Model"] in ("edsr_mr_x2+adapted", "edsr_mr_x2") and "--adapt 1" in sidecar["CommandLine"]
    assert medsr.read_volume(tmp_path / "sr.nii.gz").spatial_shape == (256, 256, 4)
    capsys.readouterr()
    assert main(["evaluate", "--scan", str(source), "--adapt", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "edsr_mr_x2+adapted" in out and "zerofill" in out
    result = medsr.evaluate("edsr_mr_x2", source, precision="fp32", adapt_seconds=1)
    row = next(r for r in result.comparison.rows if r["method"] == "edsr_mr_x2+adapted")
    assert 1.0 <= row["adapt_seconds"] < 30 and row["adapt_steps"] >= 1 and isinstance(row["adapt_kept"], bool)
