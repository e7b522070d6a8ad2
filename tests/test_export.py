import pytest
import torch

from medsr.checkpoint import save_checkpoint
from medsr.export import export_onnx, onnx_description, onnx_predictor
from medsr.infer import model_predictor, predict_tiled
from medsr.models import create_model, list_models

# Every architecture's smallest variant in 2D (the interpolation baseline has no sizes), and one 3D model with an
# anisotropic scale (N-D pixel shuffle, separable tricubic skip). Each export costs 1-4 s of fixed exporter work on
# 2 cores, so all cases but edsr_tiny in 2D are marked slow: `pytest -m "not slow"` checks one model end to end.
TINY = [(name, (2, 2)) for name in list_models() if name.endswith("_tiny") or name == "bicubic"]
CASES = [
    pytest.param(case, id=f"{case[0]}-{len(case[1])}d", marks=() if case == ("edsr_tiny", (2, 2)) else pytest.mark.slow)
    for case in [*TINY, ("edsr_tiny", (1, 1, 2))]
]


def describe(name: str, scale: tuple[int, ...]) -> dict:
    """A checkpoint description as ``train.describe`` writes it, minus the training details."""
    return {
        "model_name": name,
        "model_kwargs": {"spatial_dims": len(scale), "scale": list(scale)},
        "modality": "MR",
        "scale": list(scale) + [1] * (3 - len(scale)),
        "degradation": {"factors": [float(s) for s in [*scale, 1, 1][:3]], "kspace_window": "rect"},
        "intensity": "normalised per LR scan: 0.5th percentile -> 0, 99.9th -> 1",
    }


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    """(model in eval mode, its description, the exported ONNX file, its predictor), exported once per case."""
    name, scale = request.param
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=len(scale), scale=scale).eval()
    folder = tmp_path_factory.mktemp(name)
    save_checkpoint(folder / "checkpoint", model, describe(name, scale))
    export_onnx(folder / "checkpoint", folder / "model.onnx")
    return model, describe(name, scale), folder / "model.onnx", onnx_predictor(folder / "model.onnx", threads=1)


def test_onnxruntime_matches_torch_at_any_batch_and_size(exported):
    model, description, _, predict = exported
    spatial_dims = description["model_kwargs"]["spatial_dims"]
    for shape in [(1, 1, *(16, 13, 10)[:spatial_dims]), (3, 1, *(23, 9, 12)[:spatial_dims])]:
        lr = torch.rand(shape)
        with torch.no_grad():
            expected = model(lr)
        sr = predict(lr)
        assert sr.shape == expected.shape
        assert (sr - expected).abs().max() <= 1e-4


def test_tiled_onnx_equals_tiled_torch(exported):
    model, description, _, predict = exported
    spatial_dims = description["model_kwargs"]["spatial_dims"]
    image = torch.rand(1, *(37, 29, 12)[:spatial_dims])
    options = {
        "scale": description["model_kwargs"]["scale"],
        "tile": (16,) * spatial_dims,
        "overlap": (6,) * spatial_dims,
    }
    sr = predict_tiled(predict, image, **options)
    expected = predict_tiled(model_predictor(model, precision="fp32"), image, **options)
    assert (sr - expected).abs().max() <= 1e-4


def test_the_description_round_trips(exported):
    _, description, path, _ = exported
    assert onnx_description(path) == description


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        export_onnx(tmp_path / "no_such_checkpoint", tmp_path / "model.onnx")


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", create_model("bicubic"), describe("bicubic", (2, 2)))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="force"):
        export_onnx(tmp_path / "checkpoint", path)
    assert path.read_bytes() == b"precious"
    export_onnx(tmp_path / "checkpoint", path, force=True)
    assert onnx_description(path)["model_name"] == "bicubic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model.onnx"]  # no temp or weights file
