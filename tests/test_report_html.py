"""The HTML report: its tables hold the numbers (checked against medsr.metrics and scipy), its text is escaped, and
headless Chromium renders it with every figure decoded, no error, and a screenshot that shows something.

Chromium is installed on first use without root (tests/browser.py) and cached; the browser test is marked slow
and fails, never skips, when the install fails.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from medsr.metrics import hfen, psnr, ssim
from medsr.report import METRICS, comparison_figure, error_map_figure, profile_figure, write_html_report

from .browser import install_browser

BASELINES = ("nearest", "linear", "cubic")
WINDOW = (1000, 1400)  # screenshot width, height in CSS pixels


def _slices(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """HR: 12 slices (12, 1, 48, 40) of an ellipse phantom; methods: the x2-downsampled slab upsampled back."""
    i, j = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 40), indexing="ij")
    radius = np.hypot(i, 1.2 * j)
    image = 0.8 * (radius < 0.85) - 0.3 * (radius < 0.55) + 0.3 * (np.abs(i - 0.2) < 0.1) * (radius < 0.5)
    hr = torch.from_numpy(image + 0.02 * rng.standard_normal((12, 1, 48, 40))).float()
    lr = torch.nn.functional.avg_pool2d(hr, 2)
    modes = {"nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}
    images = {name: torch.nn.functional.interpolate(lr, scale_factor=2, mode=mode) for name, mode in modes.items()}
    images["model <x2>"] = 0.3 * images["cubic"] + 0.7 * hr  # a "model" that is better than bicubic everywhere
    return {"hr": hr, **images}


def _rows(hr: torch.Tensor, methods: dict[str, torch.Tensor]) -> list[dict[str, object]]:
    """One row per method and slice (2D scores), plus one row per method for the slab (3D SSIM)."""
    mask = hr > 0.05
    rows = []
    for name, sr in methods.items():
        scores = {
            "psnr": psnr(sr, hr, data_range=1.0),
            "ssim": ssim(sr, hr, data_range=1.0),
            "psnr_body": psnr(sr, hr, data_range=1.0, mask=mask),
            "ssim_body": ssim(sr, hr, data_range=1.0, mask=mask),
            "hfen": hfen(sr, hr),
        }
        rows += [{"method": name, "slice": 20 + k} | {m: float(v[k]) for m, v in scores.items()} for k in range(12)]
        slab = ssim(sr.permute(1, 2, 3, 0)[None], hr.permute(1, 2, 3, 0)[None], data_range=1.0)  # (1, 1, I, J, K)
        rows.append({"method": name, "slice": "20..31", "ssim3d": float(slab[0])})
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[dict[str, object]]]:
    """An HTML report with three figures, and the rows it was made from."""
    folder = tmp_path_factory.mktemp("report")
    images = _slices(np.random.default_rng(0))
    middle = {name: image[6, 0] for name, image in images.items()}
    hr = middle.pop("hr")
    figures = {
        "Slice 26 & a zoomed detail": folder / "comparison.png",
        "|method - HR|": folder / "errors.png",
        "Profile across the strongest edge": folder / "profile.png",
    }
    paths = iter(figures.values())
    comparison_figure(next(paths), {"bicubic": middle["cubic"], "model": middle["model <x2>"], "HR": hr})
    error_map_figure(next(paths), hr, middle, title="slice 26")
    profile_figure(next(paths), hr, middle, mask=hr > 0.05, title="slice 26")
    rows = _rows(images.pop("hr"), images)
    path = folder / "report.html"
    write_html_report(
        path,
        rows,
        model="model <x2>",
        baselines=BASELINES,
        unit="slice",
        degradation="2x2 average pooling <in-plane>",
        data_range=1.0,
        intensities="synthetic, in [0, 1]",
        mask="HR > 0.05 & nothing else",
        split="synthetic phantom slices 20..31, never trained on",
        figures=figures,
    )
    return path, rows


@pytest.fixture(scope="module")
def full_report(report) -> Path:
    """The report with every score an evaluation shows (RMSE and MAE in HU per slice, HF energy and LR consistency
    of the slab), four baselines as an evaluation has, a model card and provenance: as wide as reports get."""
    path, rows = report
    full = []
    for row in rows:
        if "psnr" in row:
            rmse = 4095 * 10 ** (-row["psnr_body"] / 20)
            row = row | {"rmse_body": rmse, "mae_body": 0.7 * rmse}
        else:
            row = row | {"hf_ratio": 0.93, "lr_rmse": 0.0041}
        full.append(row)
        if row["method"] == "cubic":
            full.append(row | {"method": "lanczos"})
    full_path = path.parent / "full.html"
    write_html_report(
        full_path,
        full,
        model="model <x2>",
        baselines=(*BASELINES, "lanczos"),
        unit="slice",
        degradation="2x2 average pooling",
        data_range=1.0,
        intensities="normalised to [0, 1] from -1024..3071 HU",
        mask="HR > 0.05",
        split="synthetic phantom slices 20..31",
        figures={name: path.parent / f"{name}.png" for name in ("comparison", "errors", "profile")},
        physical_unit="HU",
        model_card="# Model card: <x2>\n\n- **Task**: MR & CT",
        provenance={"Command line": "medsr evaluate --out 'a <b>'", "Model weights SHA-256": "ab" * 32},
    )
    return full_path


def test_the_report_shows_every_score_with_its_unit_the_model_card_and_provenance(full_report):
    html = full_report.read_text()
    headings = re.findall(r"<th>(.*?)</th>", html.split("<h2>Scores", 1)[1].split("</tr>", 1)[0])
    assert headings == ["method", "n", *(escape(heading.format(unit="HU")) for heading, _ in METRICS.values())]
    assert "RMSE body (HU)" in headings and "in HU (the normalised error times the window" in html
    summary = {row[0]: row for row in _cells(html, "Scores")}
    assert summary["cubic"][headings.index("HF energy / HR")] == "0.930 (n=1)"  # the slab-wide scores are there
    for text in ("# Model card: &lt;x2&gt;", "MR &amp; CT", "medsr evaluate --out &#x27;a &lt;b&gt;&#x27;", "ab" * 32):
        assert text in html
    assert re.search(r"<dt>medsr version</dt><dd>[^<]+</dd>\n<dt>Written</dt><dd>\d{4}-\d\d-\d\d ", html)


def _cells(html: str, heading: str) -> list[list[str]]:
    """The text of the body cells of the table after the <h2> that starts with ``heading``."""
    table = html.split(f"<h2>{heading}", 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    return [[re.sub(r"<[^>]*>", "", cell) for cell in row] for row in rows]


def test_report_tables_hold_the_scores(report):
    path, rows = report
    html = path.read_text()
    summary = {row[0]: row for row in _cells(html, "Scores")}
    assert list(summary) == [*BASELINES, escape("model <x2>")]  # baselines first, the model last
    cubic_psnr = [r["psnr"] for r in rows if r["method"] == "cubic" and "psnr" in r]
    assert summary["cubic"][1] == "12"
    assert summary["cubic"][2] == f"{np.mean(cubic_psnr):.2f} ± {np.std(cubic_psnr, ddof=1):.2f}"
    cubic_ssim3d = next(r["ssim3d"] for r in rows if r["method"] == "cubic" and "ssim3d" in r)
    assert summary["cubic"][6] == f"{cubic_ssim3d:.4f} (n=1)"
    model = [r["psnr"] for r in rows if r["method"] == "model <x2>" and "psnr" in r]
    difference = np.subtract(model, cubic_psnr)
    low, high = scipy.stats.t.interval(0.95, 11, loc=difference.mean(), scale=scipy.stats.sem(difference))
    differences = {row[0]: row for row in _cells(html, escape("model <x2>") + " minus")}  # a column per baseline
    assert differences["paired slices"] == ["paired slices", "12", "12", "12"]
    minus_cubic = differences["PSNR (dB)"][1 + BASELINES.index("cubic")]
    assert minus_cubic == f"{difference.mean():+.2f} [{low:+.2f}, {high:+.2f}]"
    assert "3D SSIM" not in differences  # one value per method for the slab: nothing to pair
    assert low > 0  # the better "model" is significantly better, and the report says so
    per_slice = _cells(html, "Figures")  # the per-slice table is the only one after the figures
    first_cubic = next(k for k, r in enumerate(rows) if r["method"] == "cubic")
    assert len(per_slice) == len(rows) and per_slice[first_cubic][:3] == ["cubic", "20", f"{cubic_psnr[0]:.2f}"]


def test_report_states_the_setup_escapes_text_and_embeds_figures(report):
    path, _ = report
    html = path.read_text()
    for text in ("2x2 average pooling &lt;in-plane&gt;", "HR &gt; 0.05 &amp; nothing else", "never trained on"):
        assert text in html
    assert "<x2>" not in html and "<in-plane>" not in html
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []  # atomic writes left nothing


def test_report_errors(tmp_path, report):
    _, rows = report
    common = dict(
        baselines=BASELINES, degradation="d", data_range=1.0, intensities="i", mask="m", split="s", unit="slice"
    )
    with pytest.raises(ValueError, match=r"no rows for method\(s\) \['edsr'\]"):
        write_html_report(tmp_path / "r.html", rows, model="edsr", **common)
    with pytest.raises(ValueError, match=r"unknown columns \['lpips'\]"):
        write_html_report(
            tmp_path / "r.html", [*rows, {"method": "cubic", "slice": 1, "lpips": 0.1}], model="cubic", **common
        )
    with pytest.raises(ValueError, match="each slice must be scored once"):
        write_html_report(tmp_path / "r.html", [*rows, rows[0]], model="model <x2>", **common)
    text = tmp_path / "figure.png"
    text.write_text("not a PNG")
    with pytest.raises(ValueError, match="must be PNG"):
        write_html_report(tmp_path / "r.html", rows, model="model <x2>", figures={"x": text}, **common)
    assert not (tmp_path / "r.html").exists()


@pytest.fixture(scope="module")
def browser():
    try:
        return install_browser()
    except RuntimeError as error:
        pytest.fail(f"headless Chromium could not be installed for the HTML report test: {error}")


def _render(browser, page: Path, user_data: Path) -> tuple[str, str]:
    """Chromium's DOM after the load event (``<html ...>`` start tag) and its console log lines."""
    window = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    result = browser.run(
        f"--user-data-dir={user_data}", "--enable-logging=stderr", "--v=0", window, "--dump-dom", page.as_uri()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"<html[^>]*>", result.stdout).group(0), "\n".join(re.findall(r".*:CONSOLE.*", result.stderr))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(browser, report, tmp_path):
    path, _ = report
    root, console = _render(browser, path, tmp_path / "profile")
    assert 'data-images-loaded="3"' in root and "data-errors" not in root, root
    assert console == ""
    # the check is honest: a figure that cannot be decoded is counted as an error and not as loaded
    broken = tmp_path / "broken.html"
    broken.write_text(path.read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    root, _ = _render(browser, broken, tmp_path / "profile")
    assert 'data-images-loaded="2"' in root and 'data-errors="1"' in root, root

    screenshot = tmp_path / "report.png"
    window = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    result = browser.run(profile, f"--screenshot={screenshot}", window, "--hide-scrollbars", path.as_uri())
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert grey.std() > 20  # text, tables and figures, not a blank page
    assert (grey < 64).mean() > 0.02  # dark pixels: the black backgrounds of the figures made it to the screen


@pytest.mark.slow
def test_every_table_fits_the_page_in_headless_chromium(browser, full_report, tmp_path):
    """Every score of four baselines and the model, and their paired differences, fit a 1000 pixel wide window:
    no table scrolls sideways."""
    root, console = _render(browser, full_report, tmp_path / "profile")
    assert 'data-tables-clipped="0"' in root and 'data-images-loaded="3"' in root and "data-errors" not in root, root
    assert console == ""
