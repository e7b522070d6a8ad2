"""The training-input record and the warnings `medsr upscale` gives for scans outside it."""

import pytest

from medsr.inputs import input_warnings, training_inputs

MR = training_inputs([(2.0, 2.0, 1.0), (2.4, 2.4, 1.2)], [(0.0, 200.0), (-5.0, 180.0)])
CT = training_inputs([(1.9, 1.9, 1.5)], [(-1024.0, 1400.0)])


def test_record_holds_the_ranges_over_the_training_scans():
    assert MR == {
        "spacing_mm": {"min": [2.0, 2.0, 1.0], "max": [2.4, 2.4, 1.2]},
        "low": [-5.0, 0.0],
        "high": [180.0, 200.0],
        "scans": [[0.0, 200.0], [-5.0, 180.0]],
    }


def check(inputs, modality="MR", spacing=(2.2, 2.2, 5.0), scale=(2, 2, 1), intensities=(0.0, 900.0)):
    return input_warnings(inputs, modality=modality, spacing=spacing, scale=scale, intensities=intensities)


def test_a_scan_like_the_training_scans_gives_no_warning():
    # MR units are arbitrary: a 0..900 scan normalises like a 0..200 one; k is not upscaled, so its 5 mm is fine.
    assert check(MR) == []
    assert check(CT, "CT", (1.8, 2.0, 3.0), intensities=(-1000.0, 1300.0)) == []


@pytest.mark.parametrize(
    "inputs, options, expected",
    [
        (MR, {"spacing": (0.5, 0.5, 1.0)}, ["spacing along i is 0.5 mm", "spacing along j is 0.5 mm"]),
        (MR, {"spacing": (2.0, 2.0, 6.0), "scale": (1, 1, 4)}, ["spacing along k is 6 mm"]),
        (MR, {"intensities": (-1024.0, 1500.0)}, ["intensity window starts at -0.41"]),  # a CT read as MR
        (CT, {"modality": "CT", "spacing": (1.9, 1.9, 1.5), "intensities": (-1024.0, 3500.0)}, ["-1024..3500"]),
        (CT, {"modality": "CT", "spacing": (1.9, 1.9, 1.5), "intensities": (-3024.0, 1400.0)}, []),  # padding: air
    ],
)
def test_scans_outside_the_training_range_are_named(inputs, options, expected):
    warnings = check(inputs, **options)
    assert len(warnings) == len(expected)
    for warning, text in zip(warnings, expected, strict=True):
        assert text in warning


def test_an_unknown_spacing_is_not_checked():
    assert check(MR, spacing=None) == []


def test_radiograph_pixel_size_and_units_are_not_checked():
    xray = training_inputs([(2.0, 2.0, 1.0)], [(900.0, 26000.0)])
    assert check(xray, "CR", spacing=(0.1, 0.1, 1.0), intensities=(8000.0, 20000.0)) == []
