import numpy as np
import pytest
import torch
from PIL import Image

from medsr.metrics import paired_difference
from medsr.report import (
    comparison_figure,
    detail_box,
    difference_rows,
    error_map_figure,
    format_table,
    profile_figure,
    profile_line,
    summary_rows,
)


def test_format_table_aligns_columns_with_metric_precision():
    rows = [{"method": "cubic", "psnr": 35.123456, "ssim": 0.98765432}, {"method": "edsr", "psnr": 37.5, "ssim": 0.99}]
    lines = format_table(rows, ["method", "psnr", "ssim"]).splitlines()
    assert lines[0].split() == ["method", "psnr", "ssim"]
    assert lines[2].split() == ["cubic", "35.12", "0.9877"]
    assert len({len(line) for line in lines}) == 1


def test_detail_box_finds_the_edges():
    image = torch.zeros(64, 64)
    image[40:, 20:] = 1.0  # the only edges are around (40, 20..64) and (40..64, 20)
    i, j = detail_box(image, 16)
    assert 24 <= i <= 40 and 4 <= j <= 20


def test_comparison_figure_writes_a_png(tmp_path):
    hr = torch.rand(40, 48)
    path = tmp_path / "figure.png"
    comparison_figure(path, {"LR": hr[::2, ::2], "HR": hr}, title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_summary_and_difference_rows():
    rows = [
        {"method": "cubic", "scan": "a", "psnr": 30.0, "hfen": 0.30},
        {"method": "cubic", "scan": "b", "psnr": 32.0, "hfen": 0.20},
        {"method": "cubic", "scan": "c", "psnr": 34.0},
        {"method": "edsr", "scan": "c", "psnr": 35.5},  # rows pair by scan, not by position
        {"method": "edsr", "scan": "a", "psnr": 31.0, "hfen": 0.25},
        {"method": "edsr", "scan": "b", "psnr": 33.5, "hfen": 0.10},
    ]
    summary = summary_rows(rows, ["psnr", "hfen"])
    assert summary[0] == {"method": "cubic", "n": "3", "psnr": "32.00 ± 2.00", "hfen": "0.2500 ± 0.0707 (n=2)"}
    assert format_table(summary, ["method", "n", "psnr"]).splitlines()[3].split() == ["edsr", "3", "33.33", "±", "2.25"]
    (row,) = difference_rows(rows, model="edsr", baselines=["cubic"], unit="scan", metrics=["psnr", "hfen"])
    d = paired_difference([31.0, 33.5, 35.5], [30.0, 32.0, 34.0])
    assert row == {
        "method": "edsr \N{MINUS SIGN} cubic",
        "n": "3",
        "psnr": f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
        "hfen": "-0.0750 [-0.3927, +0.2427] (n=2)",  # -0.075 ± t(0.975, 1) 0.0354 / sqrt(2), t = 12.71
    }


def _step(shape=(48, 40), edge=30, axis=0) -> torch.Tensor:
    image = torch.zeros(shape)
    image[(slice(edge, None), slice(None)) if axis == 0 else (slice(None), slice(edge, None))] = 1.0
    return image


def test_profile_line_crosses_the_strongest_edge():
    line = profile_line(_step(axis=0), half_length=8)  # the edge lies between i = 29 and 30, for every j
    assert line[0] == slice(21, 38) and isinstance(line[1], int)
    weak_and_strong = _step(axis=1, edge=10) + 3 * _step(axis=0, edge=44)
    i, span = profile_line(weak_and_strong.T.contiguous())  # transposed: the strong edge runs along j now
    assert 43 <= span.start + 16 <= 44 and span.stop == 48  # centred on it, clipped at the border
    mask = torch.zeros(48, 40, dtype=torch.bool)
    mask[:40] = True  # keeps the weak edge at j = 10 only
    fixed, span = profile_line(weak_and_strong, mask=mask)
    assert span.start <= 9 < 10 < span.stop and 0 <= fixed < 48 and mask[fixed, 10]
    with pytest.raises(ValueError, match="mask selects no voxels"):
        profile_line(weak_and_strong, mask=torch.zeros_like(mask))


def test_error_map_and_profile_figures_write_pngs(tmp_path):
    hr = _step() + 0.05 * torch.rand(48, 40)
    methods = {"blurred": torch.nn.functional.avg_pool2d(hr[None, None], 3, 1, 1)[0, 0], "shifted": hr.roll(1, 0)}
    for name, write in (("errors.png", error_map_figure), ("profile.png", profile_figure)):
        write(tmp_path / name, hr, methods, title=name)
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 500
            assert np.asarray(image.convert("L")).std() > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.png", "profile.png"]
    with pytest.raises(ValueError, match=r"shifted: shape \(47, 40\) is not the HR grid \(48, 40\)"):
        error_map_figure(tmp_path / "x.png", hr, {"shifted": hr[1:]})


def test_figures_of_several_slices_show_a_row_per_slice(tmp_path):
    hr = _step().expand(3, -1, -1) + 0.05 * torch.rand(3, 48, 40)  # (S, I, J)
    labels = ["slice 4", "slice 10", "slice 16"]
    comparison_figure(tmp_path / "one.png", {"LR": hr[0, ::2, ::2], "HR": hr[0]})
    comparison_figure(tmp_path / "three.png", {"LR": hr[:, ::2, ::2], "HR": hr}, labels=labels)
    methods = {"blurred": torch.nn.functional.avg_pool2d(hr[:, None], 3, 1, 1)[:, 0], "shifted": hr.roll(1, 1)}
    error_map_figure(tmp_path / "errors.png", hr, methods, labels=labels, unit="HU")
    sizes = {}
    for name in ("one.png", "three.png", "errors.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            sizes[name] = image.size
    assert sizes["three.png"][1] > 2 * sizes["one.png"][1]  # three pairs of rows, each somewhat smaller
    assert sizes["errors.png"][1] > sizes["errors.png"][0]  # three rows of two maps
    with pytest.raises(ValueError, match=r"hr must be an \(I, J\) slice or \(S, I, J\) slices"):
        error_map_figure(tmp_path / "x.png", hr[None], {})


def test_format_table_prints_headings_in_place_of_names():
    rows = [{"method": "cubic", "rmse_body": 12.345}]
    lines = format_table(rows, ["method", "rmse_body"], ["method", "rmse_body[HU]"]).splitlines()
    assert lines[0].split() == ["method", "rmse_body[HU]"] and lines[2].split() == ["cubic", "12.35"]
