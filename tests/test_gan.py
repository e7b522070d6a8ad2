"""GAN training: the step, the two-phase run (PSNR pre-training, then adversarial), resume, interpolation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medsr.train
from medsr.checkpoint import interpolate, load_checkpoint
from medsr.cli import main
from medsr.config import load_config
from medsr.data import Pair
from medsr.losses import l1
from medsr.models import create_model
from medsr.models.discriminators import create_discriminator
from medsr.train import check_config, fit, gan_step

CONFIG = Path(__file__).parents[1] / "configs" / "esrgan_mr_x2.yaml"
TINY_GAN = [
    "model.name=edsr_tiny",
    "data.patch=16",
    "data.batch_size=2",
    "data.train_slices=[60,70]",
    "data.val_slices=[75,77]",
    "train.steps=6",
    "train.val_every=2",
    "gan.pretrain_steps=2",
    "gan.discriminator_kwargs={channels: 4}",
]


@pytest.mark.parametrize(("adversarial", "dims"), [("vanilla", 2), ("ragan", 2), ("hinge", 2), ("ragan", 3)])
def test_gan_step_updates_both_networks(adversarial, dims):
    torch.manual_seed(0)
    generator = create_model("edsr_tiny", spatial_dims=dims, scale=(2,) * dims)
    discriminator = create_discriminator("unet", dims, channels=4)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in (generator, discriminator)]
    batch = Pair(torch.rand(2, 1, *(8,) * dims), torch.rand(2, 1, *(16,) * dims))
    logs = gan_step(
        generator, discriminator, g_optimizer, d_optimizer, batch, l1, adversarial=adversarial, adversarial_weight=0.1
    )
    assert {"loss", "loss/pixel", "loss/adversarial", "loss/d"} <= set(logs)
    for net, old in zip((generator, discriminator), before, strict=True):
        unchanged = {name for name, value in net.named_parameters() if torch.equal(value, old[name])}
        # The last bias shifts every logit alike: RaGAN compares real with fake logits, so the shift cancels, and
        # hinge, while every logit is inside the margin, gets -1 from the real half and +1 from the fake half.
        # Its gradient is zero (or rounding noise, which Adam turns into a full step).
        allowed = {"refine.4.bias"} if adversarial in ("ragan", "hinge") and net is discriminator else set()
        assert unchanged <= allowed


@pytest.mark.kernels
def test_the_esrgan_config_trains_both_phases_and_resumes_exactly(tmp_path, monkeypatch):
    """The shipped recipe, shrunk: pixel pre-training (saved in psnr/), then adversarial steps; a run stopped
    after its second validation resumes to the weights of an uninterrupted run (discriminator state included)."""
    config = load_config(CONFIG, TINY_GAN)
    fit(config, tmp_path / "clean", progress=False, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert "loss/d" not in rows[0] and "loss/d" in rows[1] and "loss/adversarial" in rows[2]
    assert load_checkpoint(tmp_path / "clean" / "psnr")[1]["step"] == 2
    assert load_checkpoint(tmp_path / "clean" / "best")[1]["step"] == 6  # a GAN's best is its latest

    calls = []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:  # steps 3 and 4 ran; step 4 validated and saved last/
            raise KeyboardInterrupt
        calls.append(1)
        return gan_step(*args, **kwargs)

    monkeypatch.setattr(medsr.train, "gan_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "stopped", progress=False, device="cpu")
    monkeypatch.undo()
    fit(None, tmp_path / "stopped", resume=True, progress=False, device="cpu")
    resumed, clean = (load_file(tmp_path / run / "last" / "model.safetensors") for run in ("stopped", "clean"))
    assert all(torch.equal(resumed[key], clean[key]) for key in clean)
    resumed_state = torch.load(tmp_path / "stopped" / "last" / "training_state.pt", weights_only=True)
    clean_state = torch.load(tmp_path / "clean" / "last" / "training_state.pt", weights_only=True)
    assert all(torch.equal(resumed_state["discriminator"][k], v) for k, v in clean_state["discriminator"].items())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("gan.discriminator=resnet", "discriminator one of"),
        ("gan.adversarial=wgan", "adversarial one of"),
        ("gan.pretrain_steps=6", "pretrain_steps < train.steps"),
        ("gan.pretrain_steps=0", "1 <= pretrain_steps"),
        ("gan.perceptual_weights=missing.safetensors", "needs gan.discriminator and an existing file"),
    ],
)
def test_bad_gan_settings_are_refused_before_training(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(load_config(CONFIG, [*TINY_GAN, override]))


def test_network_interpolation_blends_the_weights(tmp_path, capsys):
    config = load_config(CONFIG, TINY_GAN)
    fit(config, tmp_path / "run", progress=False)
    psnr, gan = tmp_path / "run" / "psnr", tmp_path / "run" / "best"
    weights = {name: load_file(path / "model.safetensors") for name, path in (("psnr", psnr), ("gan", gan))}
    assert main(["interpolate", str(psnr), str(gan), str(tmp_path / "mix"), "--alpha", "0.25"]) == 0
    mixed = load_file(tmp_path / "mix" / "model.safetensors")
    for key, value in mixed.items():
        torch.testing.assert_close(value, 0.25 * weights["psnr"][key] + 0.75 * weights["gan"][key])
    assert load_checkpoint(tmp_path / "mix")[1]["interpolation"]["alpha"] == 0.25
    with pytest.raises(ValueError, match="different networks"):
        interpolate(psnr, "edsr_mr_x2", 0.5, tmp_path / "bad")
    assert main(["interpolate", str(psnr), str(gan), str(tmp_path / "mix")]) == 2  # exists, no --force


def test_gan_step_adds_a_perceptual_term_from_user_weights(tmp_path):
    from safetensors.torch import save_file

    from medsr.perceptual import PerceptualLoss, vgg19_features

    torch.manual_seed(0)
    weights = tmp_path / "vgg.safetensors"
    save_file({f"features.{k}": v for k, v in vgg19_features(3).state_dict().items()}, str(weights))
    generator, discriminator = create_model("edsr_tiny", scale=(2, 2)), create_discriminator("patchgan", 2, channels=4)
    logs = gan_step(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters()),
        torch.optim.Adam(discriminator.parameters()),
        Pair(torch.rand(2, 1, 12, 12), torch.rand(2, 1, 24, 24)),
        l1,
        adversarial="vanilla",
        adversarial_weight=5e-3,
        perceptual=PerceptualLoss(weights, layer=3),
        perceptual_weight=1.0,
    )
    expected = logs["loss/pixel"] + 5e-3 * logs["loss/adversarial"] + logs["loss/perceptual"]
    assert logs["loss/perceptual"] > 0 and logs["loss"] == pytest.approx(expected, rel=1e-5)
