"""Losses: zero at pred == target, positive otherwise, differentiable in 2D and 3D, plus one property each."""

from __future__ import annotations

import math

import pytest
import torch

from medsr import metrics
from medsr.losses import LOSSES, charbonnier, combined, frequency_loss, gradient_loss, ssim_loss

SHAPES = {"2d": (2, 1, 16, 12), "3d": (2, 2, 12, 11, 13)}  # SSIM needs >= 11 voxels per axis


@pytest.fixture(params=sorted(SHAPES))
def pair(request) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth-ish target in [0, 1] and a noisy prediction of it, (N, C, *spatial)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(SHAPES[request.param], generator=generator)
    pred = (target + 0.05 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    return pred, target


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_for_a_perfect_prediction_positive_otherwise(name, pair):
    pred, target = pair
    loss = LOSSES[name]
    assert loss(target, target).ndim == 0
    assert loss(target, target).item() == pytest.approx(0, abs=1e-6)
    assert loss(pred, target).item() > 1e-4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_to_pred(name, pair):
    pred, target = pair
    pred = pred.clone().requires_grad_()
    LOSSES[name](pred, target).backward()
    assert pred.grad is not None
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mismatched_shapes_are_refused(name):
    with pytest.raises(ValueError, match="same shape"):
        LOSSES[name](torch.zeros(1, 1, 16, 16), torch.zeros(1, 2, 16, 16))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float64_in_float64_out(name, pair):
    pred, target = (x.double() for x in pair)
    assert LOSSES[name](pred, target).dtype == torch.float64


def test_charbonnier_between_l1_minus_eps_and_l1():
    # sqrt(d^2 + e^2) - e <= |d| <= sqrt(d^2 + e^2), so charbonnier lies in [l1 - eps, l1]
    pred, target = torch.tensor([[[[0.0, 0.5, 2e-4, -1.0]]]]), torch.zeros(1, 1, 1, 4)
    l1 = LOSSES["l1"](pred, target).item()
    value = charbonnier(pred, target, eps=1e-3).item()
    assert l1 - 1e-3 <= value <= l1
    # a single error d gives sqrt(d^2 + eps^2) - eps exactly
    assert charbonnier(torch.full((1, 1, 2, 2), 0.3), torch.zeros(1, 1, 2, 2), eps=0.4).item() == pytest.approx(0.1)


def test_charbonnier_rejects_a_non_positive_eps():
    with pytest.raises(ValueError, match="eps must be > 0"):
        charbonnier(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), eps=0)


def test_ssim_loss_is_one_minus_the_ssim_metric(pair):
    pred, target = (x.double() for x in pair)
    expected = 1 - metrics.ssim(pred, target, data_range=1.0).mean()
    torch.testing.assert_close(ssim_loss(pred, target, data_range=1.0), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(LOSSES["ssim"](pred, target), expected, rtol=0, atol=1e-12)
    # float32 inputs: same value to float32 precision
    torch.testing.assert_close(LOSSES["ssim"](*pair).double(), expected, rtol=0, atol=1e-5)


def test_ssim_loss_requires_data_range(pair):
    with pytest.raises(TypeError, match="data_range"):
        ssim_loss(*pair)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="data_range must be > 0"):
        ssim_loss(*pair, data_range=0.0)


def test_gradient_loss_ignores_a_constant_offset(pair):
    _, target = pair
    assert gradient_loss(target + 0.3, target).item() == pytest.approx(0, abs=1e-6)
    assert LOSSES["l1"](target + 0.3, target).item() == pytest.approx(0.3)


def test_gradient_loss_hand_computed():
    # error along j: [0, 1, 0] -> |diff| = [1, 1] mean 1; along i (2 rows, same error): diff 0 -> mean 0
    pred = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]])
    assert gradient_loss(pred, torch.zeros_like(pred)).item() == pytest.approx(0.5)


def test_frequency_loss_hand_computed():
    # error e = [1, 1, 0, 0] along one axis: DFT = [2, 1 - i, 0, 1 + i]; orthonormal: / sqrt(4);
    # moduli [1, sqrt(2)/2, 0, sqrt(2)/2], mean (1 + sqrt(2)) / 4
    pred = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])  # (1, 1, 1, 4)
    expected = (1 + math.sqrt(2)) / 4
    assert frequency_loss(pred, torch.zeros_like(pred)).item() == pytest.approx(expected)
    # a unit impulse has a flat spectrum 1 / sqrt(4)
    impulse = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    assert frequency_loss(impulse, torch.zeros_like(impulse)).item() == pytest.approx(0.5)


def test_frequency_loss_is_invariant_to_a_common_circular_shift(pair):
    # shifting both images multiplies the error spectrum by a unit-modulus phase ramp
    pred, target = pair
    dims = tuple(range(2, pred.ndim))
    shifts = tuple(range(1, len(dims) + 1))
    shifted = frequency_loss(pred.roll(shifts, dims), target.roll(shifts, dims))
    torch.testing.assert_close(shifted, frequency_loss(pred, target))


def test_frequency_loss_sees_phase(pair):
    # a shifted copy has the same magnitude spectrum; a magnitude-only loss would call it perfect
    _, target = pair
    assert frequency_loss(target.roll(3, dims=-1), target).item() > 0.01


def test_frequency_loss_white_noise_is_patch_size_independent():
    # orthonormal FFT + mean over frequencies: a white error of std s gives about s * sqrt(pi) / 2 at any size
    generator = torch.Generator().manual_seed(1)
    for shape in ((4, 1, 32, 32), (1, 1, 48, 48, 48)):
        noise = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        value = frequency_loss(noise, torch.zeros_like(noise)).item()
        assert value == pytest.approx(0.1 * math.sqrt(math.pi) / 2, rel=0.03)


def test_combined_is_the_weighted_sum(pair):
    pred, target = pair
    weights = {"l1": 1.0, "ssim": 0.1, "gradient": 0.5, "frequency": 2}
    expected = sum(w * LOSSES[name](pred, target) for name, w in weights.items())
    torch.testing.assert_close(combined(weights)(pred, target), expected)
    torch.testing.assert_close(combined({"mse": 3.0})(pred, target), 3 * LOSSES["mse"](pred, target))


def test_combined_copies_its_terms(pair):
    weights = {"l1": 1.0}
    loss = combined(weights)
    weights["l1"] = 5.0
    torch.testing.assert_close(loss(*pair), LOSSES["l1"](*pair))


def test_combined_gradients_flow(pair):
    pred, target = pair
    pred = pred.clone().requires_grad_()
    combined({"charbonnier": 1.0, "ssim": 0.2})(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ({}, "at least one term"),
        ({"l1": 1.0, "l3": 0.5}, r"unknown loss\(es\) \['l3'\]; known: \['charbonnier', 'frequency', 'gradient'"),
        ({"l1": 0.0}, "finite numbers > 0"),
        ({"l1": -1.0}, "finite numbers > 0"),
        ({"l1": math.nan}, "finite numbers > 0"),
        ({"l1": math.inf}, "finite numbers > 0"),
        ({"l1": True}, "finite numbers > 0"),
        ({"l1": "1"}, "finite numbers > 0"),
    ],
)
def test_combined_rejects_bad_terms(terms, message):
    with pytest.raises(ValueError, match=message):
        combined(terms)
