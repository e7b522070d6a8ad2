"""Trained models as the API hands them out (:class:`SRModel`, :func:`load_model`, :func:`list_models`), and the
models shipped in ``medsr/weights``: which one fits a scan, their held-out sets, scores, cards and summaries.

Each shipped model is a checkpoint (``checkpoint.py``) trained by a config in ``configs/`` of the same name, with a
``MODEL_CARD.md`` and held-out scores written by :func:`score_shipped` (``medsr models --evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from medsr.checkpoint import DESCRIPTION, SHIPPED_DIR, load_checkpoint, resolve_checkpoint, shipped_models
from medsr.config import Config, config_from_dict
from medsr.degrade import Degradation
from medsr.evaluation import best_baseline
from medsr.inputs import PROJECTION

DEFAULT_FACTORS = (2.0, 2.0, 1.0)  # what `medsr upscale` does without --scale or --spacing
SAME_MODELS = {"DX": "CR"}  # digital and computed radiographs look alike: one X-ray model serves both


LOG = logging.getLogger("medsr")
CARD = "MODEL_CARD.md"
REQUIRED = ("scale", "modality", "degradation", "config")  # what medsr train records and the pipeline relies on


@dataclasses.dataclass(frozen=True, eq=False)
class SRModel:
    """A trained super-resolution model and what it knows about itself.

    Args:
        name: The shipped model's name, or the checkpoint folder as given.
        network: The network in eval mode: (N, C, *spatial) in [0, 1] window units -> (N, C, *(spatial * scale)).
        description: Its ``model.json`` (``checkpoint.py``): config, degradation, inputs record, scores.
        path: The checkpoint folder.
    """

    name: str
    network: nn.Module
    description: dict[str, Any]
    path: Path

    @property
    def scale(self) -> tuple[int, int, int]:
        """Output voxels per input voxel along (i, j, k), as applied to a volume."""
        return tuple(self.description["scale"])

    @property
    def model_scale(self) -> tuple[int, ...]:
        """The network's own scale per model axis: (a, b) for 2D networks, (a, b, c) for 3D."""
        return tuple(self.description["model_kwargs"]["scale"])

    @property
    def spatial_dims(self) -> int:
        return len(self.model_scale)

    @property
    def modality(self) -> str:
        return self.description["modality"]

    @property
    def config(self) -> Config:
        """The training config."""
        return config_from_dict(self.description["config"])

    @property
    def degradation(self) -> Degradation:
        """What made the LR training inputs from HR (the acquisition the model inverts)."""
        return self.config.degradation

    @property
    def card(self) -> str:
        """The model card (Markdown): ``MODEL_CARD.md`` where it was written, else made from the description."""
        if (self.path / CARD).is_file():
            return (self.path / CARD).read_text()
        from medsr.report import model_card

        held_out = self.description.get("scores", {}).get("held_out", [])
        return model_card(self.name, self.description, held_out, precision="fp32")


def load_model(name_or_dir: str | Path) -> SRModel:
    """A shipped model by name, or a checkpoint folder written by ``medsr train``.

    >>> model = load_model("edsr_mr_x2")
    >>> model.scale, model.modality, model.degradation.factors
    ((2, 2, 1), 'MR', (2.0, 2.0, 1.0))
    """
    network, description = load_checkpoint(name_or_dir)
    missing = sorted(set(REQUIRED) - set(description))
    if missing:
        raise ValueError(f"{name_or_dir}: checkpoint description lacks {missing}; was it made by medsr train?")
    return SRModel(str(name_or_dir), network, description, resolve_checkpoint(name_or_dir))


class ModelEntry(NamedTuple):
    """One line of :func:`list_models`: ``kind`` is 'shipped' (trained weights, :func:`load_model` takes the name)
    or 'architecture' (untrained, for ``medsr train``'s ``model.name``)."""

    name: str
    kind: str
    summary: str


def list_models() -> list[ModelEntry]:
    """The shipped models, then the architectures, in one list.

    >>> [m for m in list_models() if m.name == "edsr_mr_x2"]
    [ModelEntry(name='edsr_mr_x2', kind='shipped', summary='MR x2x2x1 in-plane')]
    >>> ("edsr_small", "architecture") in [m[:2] for m in list_models()]
    True
    """
    from medsr.models import list_models as architectures

    shipped = [
        ModelEntry(name, "shipped", f"{d['modality']} x{'x'.join(map(str, d['scale']))} {_kind(d['scale'])}")
        for name, d in shipped_descriptions().items()
    ]
    return shipped + [ModelEntry(name, "architecture", "untrained") for name in architectures()]


def _kind(scale: Sequence[int]) -> str:
    return "slices" if is_through_plane(scale) else "in-plane"


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
        "kind": _kind(scale),
        "lr_spacing": spacing_text,
    }
    rows = []
    for entry in description.get("scores", {}).get("held_out", []):
        psnr = {r["method"]: r["psnr"] for r in entry["rows"]}
        baseline, best = best_baseline(entry["rows"])
        scores = {"psnr": f"{psnr[name]:.2f}", "best_baseline": f"{baseline} {best:.2f}"}
        scores |= {"psnr_cubic": f"{psnr['cubic']:.2f}", "gain_db": f"{psnr[name] - best:+.2f}"}
        adapted = next((r for r in entry["rows"] if r["method"] == f"{name}+adapted"), None)
        if adapted is not None:  # scored with --adapt: the gain after fine-tuning on the scan, and its time
            kept = "" if adapted.get("adapt_kept", True) else " (not kept)"
            scores |= {
                "adapted_gain_db": f"{adapted['psnr'] - best:+.2f}{kept}",
                "adapt": f"{adapted['adapt_seconds']:.0f} s, {adapted.get('adapt_steps', '?')} steps",
            }
        rows.append(row | {"held_out": entry["data"]} | scores)
    return rows or [row | {"held_out": "not scored: medsr models --evaluate"}]


SUMMARY_COLUMNS = ("model", "modality", "scale", "kind", "lr_spacing", "held_out", "psnr", "best_baseline", "gain_db")
ADAPT_COLUMNS = ("adapted_gain_db", "adapt")  # shown when a model was scored with --adapt


def summary_table(names: Sequence[str] | None = None) -> str:
    """The ``medsr models`` table: one line per shipped model and held-out set (all models when ``names`` is None);
    the last two columns when the stored scores include the adapted model (``medsr models --evaluate --adapt``).

    >>> print(summary_table(["edsr_mr_x2"]).splitlines()[0].split()[-4:])
    ['best_baseline', 'gain_db', 'adapted_gain_db', 'adapt']
    """
    from medsr.report import format_table

    rows = [
        row
        for name, description in shipped_descriptions().items()
        if names is None or name in names
        for row in summary_rows(name, description)
    ]
    adapted = any(ADAPT_COLUMNS[0] in row for row in rows)
    rows = [{column: "-" for column in ADAPT_COLUMNS} | row for row in rows] if adapted else rows
    return format_table(rows, SUMMARY_COLUMNS + ADAPT_COLUMNS if adapted else SUMMARY_COLUMNS)


class HeldOut(NamedTuple):
    """A set a model is scored on: a scan, its slab (None: all of it) and the scan's axis a through-plane model
    thins out (``evaluation.reference_scan``)."""

    scan: str
    slices: tuple[int, int] | None
    slice_axis: int = 2


def held_out_sets(model: SRModel) -> list[HeldOut]:
    """The sets a model is scored on: the test region of each training scan (region split; sample names kept,
    folders expanded) or the test scans (scan split, as split on this machine), and the config's
    ``held_out_scans`` (across ``held_out_slice_axis``)."""
    from medsr.data import find_scans
    from medsr.samples import resolve_scan
    from medsr.train import training_scans

    data = model.config.data
    if data.split == "region":
        sets = []
        for scan in data.scans:
            path = resolve_scan(scan)
            found = find_scans(path) if path.is_dir() else [path]  # a folder of scans, or one scan or DICOM series
            sets += [
                HeldOut(name, tuple(data.test_slices)) for name in ([scan] if found == [path] else map(str, found))
            ]
    else:
        sets = [HeldOut(str(path), None) for path in training_scans(model.config)[2]]
    return sets + [HeldOut(scan, None, data.held_out_slice_axis) for scan in data.held_out_scans]


def score_shipped(name: str, *, precision: str = "auto", adapt_seconds: float = 0.0) -> list[str]:
    """Score a shipped model on each of its held-out sets, store them in its model.json (``scores['held_out']``)
    and write its MODEL_CARD.md. Returns the sets on which it does not beat the best baseline's PSNR
    (``evaluation.best_baseline``: zero-filled k-space for MR in-plane, B-spline through-plane, Lanczos-3 or
    cubic for image-domain degradations). With ``adapt_seconds`` the model fine-tuned on each set's LR is scored
    too (``evaluation.evaluate``)."""
    from medsr.checkpoint import update_description
    from medsr.evaluation import evaluate
    from medsr.infer import resolve_precision
    from medsr.io import write_bytes
    from medsr.report import held_out_text, model_card

    if name not in shipped_models():
        raise ValueError(f"{name}: not a shipped model; shipped: {', '.join(shipped_models())}")
    model = load_model(name)
    held_out, losing = [], []
    for scan, slices, slice_axis in held_out_sets(model):
        options = {"precision": precision, "adapt_seconds": adapt_seconds, "slice_axis": slice_axis}
        result = evaluate(model, scan, slices, **options)
        data = held_out_text(Path(scan).name, result.slab if slices else None, slice_axis)
        rows = result.comparison.rows
        slab = [*result.slab[:2]] if slices else None
        held_out.append({"data": data, "scan": str(scan), "slices": slab, "slice_axis": slice_axis, "rows": rows})
        psnr = {row["method"]: row["psnr"] for row in rows}
        baseline, best = best_baseline(rows)
        if psnr[name] <= best:
            losing.append(f"{name} does not beat {baseline} on {data}: {psnr[name]:.2f} <= {best:.2f} dB")
        LOG.info("%s on %s: %.2f dB, best baseline %s %.2f dB", name, data, psnr[name], baseline, best)
    scores = {k: v for k, v in model.description["scores"].items() if k != "test"} | {"held_out": held_out}
    updates = {"parameters": sum(p.numel() for p in model.network.parameters()), "scores": scores}
    update_description(model.path, **updates)
    card = model_card(name, model.description | updates, held_out, precision=resolve_precision(precision))
    write_bytes(model.path / CARD, card.encode())
    return losing
