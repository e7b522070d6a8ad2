import torch
from PIL import Image

from medsr.report import comparison_figure, detail_box, format_table


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
