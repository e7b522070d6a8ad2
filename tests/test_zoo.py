"""Choosing a shipped model by modality and scale."""

import json

import pytest

from medsr import checkpoint, zoo
from medsr.zoo import choose_model


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """Shipped models of these modalities and (i, j, k) scales (descriptions only: choosing reads no weights)."""
    for name, modality, scale in [
        ("mr_x2", "MR", [2, 2, 1]),
        ("mr_x4", "MR", [4, 4, 1]),
        ("mr_slices_x4", "MR", [1, 1, 4]),
        ("ct_x2", "CT", [2, 2, 1]),
        ("xray_x2", "CR", [2, 2, 1]),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps({"modality": modality, "scale": scale}))
    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", tmp_path)
    monkeypatch.setattr(zoo, "SHIPPED_DIR", tmp_path)


@pytest.mark.parametrize(
    "modality, factors, expected",
    [
        ("MR", None, "mr_x2"),  # the default: x2 in-plane
        ("MR", (4, 4, 1), "mr_x4"),  # exact
        ("MR", (3, 3, 1), "mr_x4"),  # the smallest that reaches 3, then resampled down
        ("MR", (6, 6, 1), "mr_x4"),  # none reaches 6: the largest, then resampled up
        ("MR", (1, 1, 4), "mr_slices_x4"),
        ("MR", (1, 1, 2.5), "mr_slices_x4"),
        ("CT", (2, 2, 1), "ct_x2"),
        ("DX", None, "xray_x2"),  # digital radiographs use the radiograph model
    ],
)
def test_the_model_for_a_modality_and_factors(fake_zoo, modality, factors, expected):
    assert choose_model(modality, factors) == expected


@pytest.mark.parametrize("modality, factors", [("US", None), ("CT", (1, 1, 3)), ("MR", (2, 2, 4))])
def test_no_fitting_model_is_a_clear_error(fake_zoo, modality, factors):
    with pytest.raises(ValueError, match=f"no shipped {modality} model.*shipped: ct_x2"):
        choose_model(modality, factors)


def test_every_modality_has_a_shipped_default():
    for modality in ("MR", "CT", "US", "CR", "DX"):
        assert choose_model(modality, None)
