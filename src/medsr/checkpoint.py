"""Model checkpoints: a folder with safetensors weights and a JSON description that rebuilds the model.

``model.safetensors`` holds the weights (no pickle, safe to load from anywhere). ``model.json`` holds the
registered model name and its kwargs, the modality, the degradation it learned to invert, how intensities
were normalised, the training config and step, and held-out scores. Shipped models live in ``medsr/weights``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medsr.models import create_model

WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"
TRAINING_STATE = "training_state.pt"
SHIPPED_DIR = Path(__file__).parent / "weights"


def save_checkpoint(
    directory: Path, model: nn.Module, description: dict[str, Any], state: dict[str, Any] | None = None
) -> None:
    """Write ``directory/model.safetensors`` and ``directory/model.json``, each atomically.

    ``description`` must hold ``model_name`` and ``model_kwargs`` (what :func:`create_model` needs). ``state``
    (optimiser, schedule, step: what resuming needs) goes to ``training_state.pt``. The three files are not
    replaced together: to update a checkpoint as a whole, write a new folder and swap it in (``train`` does).
    """
    missing = {"model_name", "model_kwargs"} - set(description)
    if missing:
        raise ValueError(f"checkpoint description lacks {sorted(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    if state is not None:
        tmp_state = directory / f".tmp.{TRAINING_STATE}"
        torch.save(state, tmp_state)
        os.replace(tmp_state, directory / TRAINING_STATE)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    tmp_weights = directory / f".tmp.{WEIGHTS}"
    save_file(weights, str(tmp_weights))
    tmp_json = directory / f".tmp.{DESCRIPTION}"
    tmp_json.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS)
    os.replace(tmp_json, directory / DESCRIPTION)


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of a ``last/`` checkpoint, for resuming; the state must match the weights' step.

    The state is plain tensors and numbers, loaded with ``weights_only=True`` (no pickled code).
    """
    if not (directory / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"{directory}: no {TRAINING_STATE}; nothing to resume (was the run ever validated?)")
    state = torch.load(directory / TRAINING_STATE, weights_only=True)
    step = json.loads((directory / DESCRIPTION).read_text())["step"]
    if state["step"] != step:
        raise ValueError(f"{directory}: training state is at step {state['step']} but the weights at {step}")
    return load_file(str(directory / WEIGHTS)), state


def update_description(directory: Path, **fields: Any) -> None:
    """Add or replace top-level fields of ``directory/model.json`` (e.g. held-out scores), atomically."""
    description = json.loads((directory / DESCRIPTION).read_text())
    tmp = directory / f".tmp.{DESCRIPTION}"
    tmp.write_text(json.dumps(description | fields, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / DESCRIPTION)


def interpolate(psnr: Path | str, gan: Path | str, alpha: float, out: Path) -> None:
    """Network interpolation (ESRGAN, Wang et al. 2018): weights ``alpha * psnr + (1 - alpha) * gan``, a smooth
    dial between the PSNR-oriented generator (alpha 1) and its adversarially fine-tuned copy (alpha 0).

    Both must be the same architecture (``fit`` saves them as ``psnr/`` and ``best/`` of a GAN run); ``out`` gets
    the GAN's description with ``interpolation: {psnr, gan, alpha}``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    (model_a, description_a), (model_b, description) = load_checkpoint(psnr), load_checkpoint(gan)
    if (description_a["model_name"], description_a["model_kwargs"]) != (
        description["model_name"],
        description["model_kwargs"],
    ):
        raise ValueError(f"{psnr} and {gan} are different networks; interpolation needs one architecture")
    weights_a = model_a.state_dict()
    model_b.load_state_dict(
        {
            k: alpha * weights_a[k] + (1 - alpha) * v if v.is_floating_point() else v
            for k, v in model_b.state_dict().items()
        }
    )
    interpolation = {"psnr": str(resolve_checkpoint(psnr)), "gan": str(resolve_checkpoint(gan)), "alpha": alpha}
    unscored = {k: v for k, v in description.items() if k != "scores"}  # the GAN's scores are not the blend's
    save_checkpoint(out, model_b, unscored | {"interpolation": interpolation})


def resolve_checkpoint(name_or_path: Path | str) -> Path:
    """A checkpoint folder from a path, or from the name of a shipped model (see :func:`shipped_models`)."""
    path = Path(name_or_path)
    if (path / DESCRIPTION).is_file():
        return path
    if (SHIPPED_DIR / str(name_or_path) / DESCRIPTION).is_file():
        return SHIPPED_DIR / str(name_or_path)
    raise FileNotFoundError(
        f"{name_or_path}: not a checkpoint folder (with {DESCRIPTION} and {WEIGHTS}) nor a shipped model; "
        f"shipped: {', '.join(shipped_models()) or 'none'}"
    )


def load_checkpoint(name_or_path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model in eval mode and return it with its description."""
    directory = resolve_checkpoint(name_or_path)
    try:
        description = json.loads((directory / DESCRIPTION).read_text())
        model = create_model(description["model_name"], **description["model_kwargs"])
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{directory}: broken checkpoint ({type(error).__name__}: {error})") from error
    return model.eval(), description


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / DESCRIPTION).is_file())
