"""Model checkpoints: a folder with safetensors weights and a JSON description that rebuilds the model.

``model.safetensors`` holds the weights (no pickle, safe to load from anywhere). ``model.json`` holds the
registered model name and its kwargs, the modality, the degradation it learned to invert, how intensities
were normalised, the training config and step, and held-out scores. Shipped models live in ``medsr/weights``.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from medsr.config import config_from_dict, problem, read_limited, short
from medsr.degrade import Degradation
from medsr.io import atomic_output, write_bytes
from medsr.models import create_model

WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"
TRAINING_STATE = "training_state.pt"
SHIPPED_DIR = Path(__file__).parent / "weights"
# The types of the description's fields that medsr reads; model_name and model_kwargs are required.
_FIELDS = {"model_name": str, "model_kwargs": dict, "modality": str, "scale": list, "step": int, "config": dict}
_FIELDS |= {"degradation": dict, "inputs": dict, "scores": dict}
_JSON_TYPES = {str: "string", dict: "object", list: "array", int: "integer"}


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
        with atomic_output(directory / TRAINING_STATE) as tmp:
            torch.save(state, tmp)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_output(directory / WEIGHTS) as tmp:
        save_file(weights, str(tmp))
    write_bytes(directory / DESCRIPTION, (json.dumps(description, indent=2, sort_keys=True) + "\n").encode())


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of a ``last/`` checkpoint, for resuming; the state must match the weights' step.

    The state must be a torch zip archive of plain tensors and numbers, loaded with ``weights_only=True``: a plain
    pickle is refused unread, and one that needs any other class is refused by the loader (nothing of it is run).
    Every tensor must be finite.
    """
    path = directory / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {TRAINING_STATE}; nothing to resume (was the run ever validated?)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a medsr checkpoint (not a torch zip archive); refused, nothing was unpickled")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # a GPU run resumes anywhere
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: not a medsr checkpoint (it pickles objects other than tensors and numbers); refused, nothing "
            "of it was unpickled or run"
        ) from error
    except (RuntimeError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a medsr checkpoint ({problem(error)})") from error
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), dict) for k in ("optimizer", "schedule", "best")
    ):
        raise ValueError(f"{path}: not a medsr training state (a dict with optimizer, schedule, best and step)")
    step = read_description(directory).get("step")
    if type(state.get("step")) is not int or state["step"] != step:
        raise ValueError(
            f"{directory}: training state is at step {short(repr(state.get('step')), 40)} but the weights at {step}"
        )
    weights = _load_weights(directory / WEIGHTS)
    check_finite(state, path)
    return weights, state


def read_description(directory: Path) -> dict[str, Any]:
    """``directory/model.json``, checked: a JSON object (at most 1 MB) with the model's name and kwargs, and the
    types of the other fields medsr writes; a one-line ValueError naming the file otherwise."""
    path = directory / DESCRIPTION
    try:
        description = json.loads(read_limited(path))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: broken checkpoint (cannot read it: {problem(error)})") from error
    if not isinstance(description, dict):
        raise ValueError(f"{path}: broken checkpoint (expected a JSON object, got a {type(description).__name__})")
    for key, kind in _FIELDS.items():
        if (key in description or key in ("model_name", "model_kwargs")) and not isinstance(description.get(key), kind):
            raise ValueError(f"{path}: broken checkpoint ({key} must be a JSON {_JSON_TYPES[kind]})")
    if not all(type(s) is int and s >= 1 for s in description.get("scale", [])):
        raise ValueError(f"{path}: broken checkpoint (scale must be integers >= 1)")
    checks = {"config": config_from_dict, "degradation": lambda fields: Degradation(**fields)}
    for key, check in checks.items():
        try:
            if key in description:
                check(description[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: broken checkpoint ({key}: {problem(error)})") from error
    return description


def check_finite(tensors: Any, file: Path, name: str = "") -> None:
    """Refuse NaN or Inf in any tensor of ``tensors`` (nested dicts and lists), naming the file and the tensor."""
    if isinstance(tensors, dict | list | tuple):
        items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
        for key, value in items:
            check_finite(value, file, f"{name}.{key}" if name else str(key))
    elif isinstance(tensors, torch.Tensor) and tensors.is_floating_point() and not torch.isfinite(tensors).all():
        raise ValueError(f"{file}: tensor {name} holds NaN or Inf; refused")


def _load_weights(path: Path, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, finite, and (given ``expected``) with its names and shapes, checked
    before any is read."""
    try:
        with safe_open(str(path), "pt") as file:
            if expected is not None:
                shapes = {name: file.get_slice(name).get_shape() for name in file.keys()}
                wanted = {name: list(tensor.shape) for name, tensor in expected.items()}
                if shapes != wanted:
                    raise ValueError(f"{path}: broken checkpoint ({_difference(shapes, wanted)})")
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{path}: broken checkpoint ({problem(error)})") from error
    check_finite(tensors, path)
    return tensors


def _difference(shapes: dict[str, list[int]], wanted: dict[str, list[int]]) -> str:
    """How the tensors of a file differ from what the network needs, briefly."""
    missing, unexpected = sorted(wanted.keys() - shapes.keys()), sorted(shapes.keys() - wanted.keys())
    if missing or unexpected:
        missing_text, unexpected_text = short(", ".join(missing)) or "none", short(", ".join(unexpected)) or "none"
        return f"tensors missing: {missing_text}; unexpected: {unexpected_text}"
    name = next(name for name in wanted if shapes[name] != wanted[name])
    return f"tensor {name} has shape {shapes[name]}, the network needs {wanted[name]}"


def update_description(directory: Path, **fields: Any) -> None:
    """Add or replace top-level fields of ``directory/model.json`` (e.g. held-out scores), atomically."""
    description = read_description(directory)
    write_bytes(directory / DESCRIPTION, (json.dumps(description | fields, indent=2, sort_keys=True) + "\n").encode())


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
    """Rebuild a model in eval mode and return it with its description.

    Everything is checked before use, with a one-line ValueError naming the file: the description
    (:func:`read_description`), the kwargs and size of the network (``create_model``), and the weights' names, shapes
    and values (finite) before they are loaded."""
    directory = resolve_checkpoint(name_or_path)
    description = read_description(directory)
    try:
        model = create_model(description["model_name"], **description["model_kwargs"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / DESCRIPTION}: broken checkpoint ({problem(error)})") from error
    model.load_state_dict(_load_weights(directory / WEIGHTS, model.state_dict()))
    return model.eval(), description


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / DESCRIPTION).is_file())
