"""Per-scan adaptation (test-time training): fine-tune a model on pairs made from the scan it is about to upscale.

The scan is the model's LR input; degraded once more by the model's own degradation it gives an LLR scan, and
(LLR, LR) pairs teach the model this scan's contrast, noise and anatomy one scale down. That is ZSSR's idea
(Shocher et al., "Zero-Shot Super-Resolution using Deep Internal Learning", CVPR 2018), started from the trained
model instead of from scratch, as test-time adaptation does; the model then upscales the scan itself. It assumes
the scan's structure looks alike one scale down (self-similarity), which holds better for texture than for
anatomy: ``medsr evaluate --adapt`` measures whether it pays on a given kind of scan.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from medsr.data import PairDataset, prepare_scan
from medsr.infer import resolve_precision
from medsr.losses import LOSSES
from medsr.progress import progress_bar
from medsr.volume import Volume, integer_scale

if TYPE_CHECKING:
    from medsr.zoo import SRModel

MAX_PATCH = 64  # LR-scale patch edge: small scans use what they have
MIN_PATCH = 8  # per upscaled axis, in LLR voxels; smaller scans cannot be adapted on
ADAPT_LR = 5e-5  # a tenth of the training rate: stay near the trained model
BATCH = 8


def adapt(
    model: SRModel,
    scan: Volume,
    *,
    seconds: float = 60.0,
    max_steps: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    progress: bool = False,
) -> SRModel:
    """A copy of ``model`` fine-tuned on (LLR, LR) pairs of ``scan`` for ``seconds`` (or ``max_steps`` steps).

    Args:
        model: The trained model; it is not changed.
        scan: The LR scan in physical units, (C, I, J, K), with its modality (it picks the window rule).
        seconds: Wall-time budget of the fine-tuning.
        max_steps: Stop after this many steps (reproducible, whatever the machine's speed); None: time only.
        seed: Seed of the patch draws.
        precision: 'bf16' trains under bf16 autocast ('auto': where the CPU has it natively).

    Returns:
        The adapted model, named ``<name>+adapted``, in eval mode.

    Raises:
        ValueError: The scan is too small along an upscaled axis to make LLR patches.

    >>> import medsr, torch
    >>> model = medsr.load_model("edsr_mr_x2")
    >>> scan = medsr.Volume(torch.rand(1, 40, 40, 2) * 100, torch.eye(4), medsr.Modality.MR)
    >>> adapted = adapt(model, scan, max_steps=2)
    >>> adapted.name, adapted.network is model.network
    ('edsr_mr_x2+adapted', False)
    """
    degradation = model.degradation
    scale = integer_scale(degradation.factors)
    hr = prepare_scan(scan, degradation)  # the scan as HR: cropped to the scale, normalised with its LLR's window
    patch = _patch(hr.spatial_shape, scale, model.spatial_dims, str(model.name))
    pairs = PairDataset(
        [hr], degradation, slices=None, patch=patch, length=1024, seed=seed, spatial_dims=model.spatial_dims
    )
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
    return dataclasses.replace(model, name=f"{model.name}+adapted", network=network.eval())


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
