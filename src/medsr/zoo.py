"""The models shipped in ``medsr/weights``: which one fits a scan, and their one-line summaries.

Each is a checkpoint (``checkpoint.py``) trained by a config in ``configs/`` of the same name, with a
``MODEL_CARD.md`` and held-out scores written by ``medsr models --evaluate``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from medsr.checkpoint import DESCRIPTION, SHIPPED_DIR, shipped_models
from medsr.inputs import PROJECTION

DEFAULT_FACTORS = (2.0, 2.0, 1.0)  # what `medsr upscale` does without --scale or --spacing
SAME_MODELS = {"DX": "CR"}  # digital and computed radiographs look alike: one X-ray model serves both


def shipped_descriptions() -> dict[str, dict[str, Any]]:
    """Name -> ``model.json`` of every shipped model, sorted by name."""
    return {name: json.loads((SHIPPED_DIR / name / DESCRIPTION).read_text()) for name in shipped_models()}


def model_family(modality: str) -> str:
    """The modality whose models serve ``modality`` (DX scans use the CR model)."""
    return SAME_MODELS.get(modality, modality)


def upscaled_axes(scale: Sequence[int]) -> tuple[int, ...]:
    """The voxel axes (0 = i, 1 = j, 2 = k) a model of (i, j, k) ``scale`` upsamples."""
    return tuple(axis for axis, factor in enumerate(scale) if factor > 1)


def is_through_plane(scale: Sequence[int]) -> bool:
    """Whether a model of (i, j, k) ``scale`` makes thin slices from thick ones (and nothing in-plane)."""
    return scale[2] > 1 and tuple(scale[:2]) == (1, 1)


def choose_model(modality: str, factors: Sequence[float] | None) -> str:
    """The shipped model for a scan of ``modality`` upscaled by ``factors`` (i, j, k; None: x2 in-plane).

    Among the modality's models of the right kind (in-plane when the k factor is 1, through-plane when only k is
    upscaled), the one whose scale equals the factors, else the smallest that reaches them (the output is then
    resampled down to the factors), else the largest.

    Raises:
        ValueError: No shipped model of that modality and kind.
    """
    factors = tuple(factors or DEFAULT_FACTORS)
    wanted = model_family(modality)
    through = factors[2] > 1 + 1e-6
    fitting = {
        name: description["scale"]
        for name, description in shipped_descriptions().items()
        if model_family(description["modality"]) == wanted
        and (is_through_plane(description["scale"]) if through else description["scale"][2] == 1)
    }
    if not fitting or (through and max(factors[:2]) > 1 + 1e-6):
        kind = "through-plane (1, 1, c)" if through else "in-plane (a, b, 1)"
        shipped = [f"{n} ({d['modality']} {d['scale']})" for n, d in shipped_descriptions().items()]
        raise ValueError(
            f"no shipped {modality} model for factors {factors} ({kind}); shipped: {', '.join(shipped)}; "
            "pass --model with your own checkpoint"
        )
    axes = (2,) if through else (0, 1)
    reach = {name: min(scale[a] for a in axes) for name, scale in fitting.items()}
    need = max(factors[a] for a in axes)
    exact = [n for n, scale in fitting.items() if all(abs(scale[a] - factors[a]) < 1e-6 for a in range(3))]
    enough = sorted((r, n) for n, r in reach.items() if r >= need - 1e-6)
    return exact[0] if exact else enough[0][1] if enough else max((r, n) for n, r in reach.items())[1]


def summary_rows(name: str, description: dict[str, Any]) -> list[dict[str, Any]]:
    """The lines of ``medsr models`` for one model: what it does, on what spacing, and its PSNR next to bicubic's
    on each held-out set of ``scores['held_out']`` (as ``medsr models --evaluate`` writes it), one line each."""
    spacing = description.get("inputs", {}).get("spacing_mm")
    scale = description["scale"]
    if spacing is None or description["modality"] in PROJECTION:
        spacing_text = "-"
    else:
        spacing_text = "x".join(f"{spacing['min'][a]:.3g}" for a in upscaled_axes(scale)) + " mm"
    row = {
        "model": name,
        "modality": description["modality"],
        "scale": "x".join(str(s) for s in scale),
        "kind": "slices" if is_through_plane(scale) else "in-plane",
        "lr_spacing": spacing_text,
    }
    rows = []
    for entry in description.get("scores", {}).get("held_out", []):
        psnr = {r["method"]: r["psnr"] for r in entry["rows"]}
        model, cubic = psnr[name], psnr["cubic"]
        scores = {"psnr": f"{model:.2f}", "psnr_cubic": f"{cubic:.2f}", "gain_db": f"{model - cubic:+.2f}"}
        rows.append(row | {"held_out": entry["data"]} | scores)
    return rows or [row | {"held_out": "not scored: medsr models --evaluate"}]
