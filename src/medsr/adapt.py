"""Per-scan adaptation (test-time training): fine-tune a model on pairs made from the scan it is about to upscale.

The scan is the model's LR input; degraded once more by the model's own degradation it gives an LLR scan, and
(LLR, LR) pairs teach the model this scan's contrast, noise and anatomy one scale down. That is ZSSR's idea
(Shocher et al., "Zero-Shot Super-Resolution using Deep Internal Learning", CVPR 2018), started from the trained
model instead of from scratch, as test-time adaptation does; the model then upscales the scan itself. It assumes
the scan's structure looks alike one scale down (self-similarity), which holds better for texture than for
anatomy, and a small scan is easily overfitted. So a part of the scan (``HOLD_OUT``: its last slices, or its last
columns for a single slice) is kept out of the fine-tuning, and the adapted model is kept only if it predicts that
part's LR from its LLR better than the model did (``medsr evaluate --adapt`` measures what that buys).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from medsr.data import PairDataset, crop_to_multiple, degrade_normalised, prepare_scan
from medsr.infer import model_predictor, predict_volume, resolve_precision
from medsr.losses import LOSSES
from medsr.progress import progress_bar
from medsr.volume import Volume, crop, integer_scale

if TYPE_CHECKING:
    from medsr.zoo import SRModel

MAX_PATCH = 64  # LR-scale patch edge: small scans use what they have
MIN_PATCH = 8  # per upscaled axis, in LLR voxels; smaller scans cannot be adapted on
ADAPT_LR = 5e-5  # a tenth of the training rate: stay near the trained model
BATCH = 8
HOLD_OUT = 0.25  # share of the scan kept out of the fine-tuning to check it
MIN_GAIN = 0.01  # relative error drop on the held-out part that the adapted model must show to be kept
LOG = logging.getLogger("medsr")


class Adaptation(NamedTuple):
    """What :func:`adapt` did: the model to use (``model.name + '+adapted'`` if kept, else the model itself), whether
    the fine-tuned one was kept, its steps and seconds, and the held-out part's error before and after
    (mean absolute, normalised units)."""

    model: SRModel
    kept: bool
    steps: int
    seconds: float
    error_before: float
    error_after: float


def adapt(
    model: SRModel,
    scan: Volume,
    *,
    seconds: float = 60.0,
    max_steps: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    progress: bool = False,
) -> Adaptation:
    """A copy of ``model`` fine-tuned on (LLR, LR) pairs of ``scan`` for ``seconds`` (or ``max_steps`` steps).

    Args:
        model: The trained model; it is not changed.
        scan: The LR scan in physical units, (C, I, J, K), with its modality (it picks the window rule).
        seconds: Wall-time budget of the fine-tuning.
        max_steps: Stop after this many steps (reproducible, whatever the machine's speed); None: time only.
        seed: Seed of the patch draws.
        precision: 'bf16' trains under bf16 autocast ('auto': where the CPU has it natively).

    Returns:
        The :class:`Adaptation`: its model is the adapted one, named ``<name>+adapted``, in eval mode; or ``model``
        itself when the adapted one does not predict the held-out part of the scan better (``MIN_GAIN``).

    Raises:
        ValueError: The scan is too small along an upscaled axis to make LLR patches.

    >>> import medsr, torch
    >>> model = medsr.load_model("edsr_mr_x2")
    >>> scan = medsr.Volume(torch.rand(1, 40, 40, 2) * 100, torch.eye(4), medsr.Modality.MR)
    >>> result = adapt(model, scan, max_steps=2)  # kept only if it predicts the held-out slices better
    >>> result.steps, result.model.name == ("edsr_mr_x2+adapted" if result.kept else "edsr_mr_x2")
    (2, True)
    """
    degradation = model.degradation
    scale = integer_scale(degradation.factors)
    hr = prepare_scan(scan, degradation)  # the scan as HR: cropped to the scale, normalised with its LLR's window
    tuned, held = _split(hr, scale, model.spatial_dims)
    patch = _patch(tuned.spatial_shape, scale, model.spatial_dims, str(model.name))
    pairs = PairDataset([tuned], degradation, patch=patch, length=1024, seed=seed, spatial_dims=model.spatial_dims)
    network = copy.deepcopy(model.network).float()
    optimizer = torch.optim.Adam(network.parameters(), lr=ADAPT_LR)
    bf16 = resolve_precision(precision) == "bf16"
    start, step = time.monotonic(), 0
    bar = progress_bar(total=max_steps, desc="adapt", unit="step", disable=not progress)
    network.train()
    while (max_steps is None or step < max_steps) and (max_steps is not None or time.monotonic() - start < seconds):
        items = [pairs[(step * BATCH + i) % len(pairs)] for i in range(BATCH)]
        lr, target = torch.stack([p.lr for p in items]), torch.stack([p.hr for p in items])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = network(lr)
        loss = LOSSES["l1"](output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
    bar.close()
    seconds = time.monotonic() - start
    check = degrade_normalised(held, degradation, rng=np.random.default_rng(seed))
    before, after = (_error(net, check, held, scale, model.spatial_dims) for net in (model.network, network))
    kept = after <= (1 - MIN_GAIN) * before
    LOG.info(
        "%s: %s after %d steps (%.0f s): held-out error %.4g -> %.4g",
        model.name,
        "adapted" if kept else "adaptation not kept",
        step,
        seconds,
        before,
        after,
    )
    chosen = dataclasses.replace(model, name=f"{model.name}+adapted", network=network.eval()) if kept else model
    return Adaptation(chosen, kept, step, seconds, before, after)


def _split(hr: Volume, scale: tuple[int, int, int], spatial_dims: int) -> tuple[Volume, Volume]:
    """(part to fine-tune on, part to check on): the last ``HOLD_OUT`` of the slices along k for a 2D in-plane model
    on 4 slices or more, else of the columns along i (cut at a multiple of the scale)."""
    shape = hr.spatial_shape
    axis = 2 if spatial_dims == 2 and scale[2] == 1 and shape[2] >= 4 else 0
    cut = round(shape[axis] * (1 - HOLD_OUT)) // scale[axis] * scale[axis]
    if not 0 < cut < shape[axis]:
        raise ValueError(f"the scan has {shape[axis]} voxels along {'ijk'[axis]}: too few to adapt on and check")
    stop = list(shape)
    stop[axis], start = cut, [0, 0, 0]
    tuned = crop(hr, (0, 0, 0), stop)
    start[axis] = cut
    return tuned, crop_to_multiple(crop(hr, start, shape), scale=scale)


def _error(network: torch.nn.Module, lr: Volume, hr: Volume, scale, spatial_dims: int) -> float:
    """Mean absolute error of ``network`` upsampling ``lr`` against ``hr`` (normalised units), in float32."""
    predictor = model_predictor(network, precision="fp32")
    sr = predict_volume(predictor, lr, scale=scale, spatial_dims=spatial_dims, progress=False)
    return float((sr.array - hr.array).abs().mean())


def _patch(shape: tuple[int, int, int], scale: tuple[int, int, int], spatial_dims: int, name: str) -> list[int]:
    """Patch edges per model axis: up to ``MAX_PATCH`` LR voxels, multiples of the scale, inside the scan."""
    through_plane = spatial_dims == 2 and scale[2] != 1
    axes = ((0, 2) if through_plane else (0, 1)) if spatial_dims == 2 else (0, 1, 2)
    sizes = []
    for axis in axes:
        extent = min(shape[0], shape[1]) if through_plane and axis == 0 else shape[axis]
        size = min(MAX_PATCH, extent) // scale[axis] * scale[axis]
        if size // scale[axis] < MIN_PATCH and scale[axis] > 1:
            raise ValueError(
                f"{name}: the scan has {extent} voxels along {'ijk'[axis]}, too few to adapt on (needs "
                f"{MIN_PATCH * scale[axis]} for LLR patches of {MIN_PATCH})"
            )
        sizes.append(max(size, scale[axis]))
    return sizes
