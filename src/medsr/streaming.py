"""Super-resolve scans too large for memory, file to file, slab by slab along k: peak memory does not grow with K.

The result is the in-memory path's, ``write_volume(super_resolve(read_volume(source), ...), target)``, for
integer scales: the same window (``window_from_slices``: exact percentiles over all voxels, in two passes over the
source), the same tiles (``infer.volume_tiling`` of the whole volume), the same affine (``scale_affine``) and the
same writers (``volume_writer``).

Why it is exact: a slab is one row of the whole volume's tiles along k (for a 2D model upsampling in-plane, the
planes ``predict_volume`` stacks into one call), and ``predict_volume`` on the slab makes the very predictor calls
it makes for that row on the whole volume (``infer._predict_stack`` goes row by row along the last axis). Each slab
keeps along k what that row of tiles keeps (``infer.tile_bounds``), so the voxels are the in-memory ones bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medsr.consistency import kspace_consistency
from medsr.degrade import Degradation
from medsr.infer import DEFAULT_MEMORY, Predictor, Tiling, predict_volume, tile_bounds, tile_starts, volume_tiling
from medsr.intensity import Window, window_from_slices
from medsr.io import VolumeFile, check_output, open_volume, volume_writer
from medsr.progress import progress_bar
from medsr.volume import Modality, Volume, integer_scale, scale_affine

if TYPE_CHECKING:
    from medsr.deidentify import Deidentifier


def stream_upscale(
    source: Path | str | VolumeFile,
    target: Path | str,
    predictor: Predictor,
    *,
    scale: Sequence[int],
    spatial_dims: int,
    modality: Modality | str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
    description: str = "super-resolved by medsr",
    anonymize: bool | Deidentifier = False,
    progress: bool = True,
    window: Window | None = None,
    consistency: Degradation | None = None,
    dtype: str = "float32",
    display_range: tuple[float, float] | None = None,
    model: str | None = None,
    new_study: bool = False,
    enhanced: bool = False,
    floor: float | None = None,
) -> None:
    """Super-resolve the scan at ``source`` into ``target`` holding only a slab of it in memory at a time.

    Memory: one forward works within ``memory``; besides, a slab of input slices and its output are held: for a 2D
    model upsampling in-plane the planes stacked into one call, else one row of tiles along k (the tile's depth),
    whatever K is. The source is read three times for MR and other non-CT modalities (twice for the
    window), once for CT. A DICOM target also needs I * J * K * 4 bytes of temporary disk beside it (see
    :func:`medsr.io.volume_writer`).

    Args:
        source: A .nii/.nii.gz file or a DICOM series folder, or one opened by ``io.open_volume``. Prefer .nii for
            huge scans: .nii.gz is decompressed once per pass (fast, in k order), but cannot be read out of order.
        target: A .nii/.nii.gz file or a DICOM series folder (a name without suffix), as for ``write_volume``:
            written atomically; an existing NIfTI file is replaced, a DICOM folder only if medsr wrote it.
        predictor: Maps (N, C, *tile) float32 in [0, 1] window units to (N, C, *(tile * scale)), e.g.
            ``infer.model_predictor(model)``.
        scale: Integer factor per voxel axis (i, j, k) as applied to the volume (``infer.model_plan``).
        spatial_dims: 2 or 3, what the predictor takes; a 2D one runs in-plane, or through-plane for (1, 1, s).
        modality: Overrides the source's (NIfTI has none, reads as OT); it picks the window rule.
        tile, overlap, memory: As for :func:`medsr.infer.predict_volume`: tiles from the memory budget, chosen for
            the whole volume, overlapping by twice the model's receptive radius.
        description, anonymize: As for ``write_volume``: what made the output (DICOM SeriesDescription, NIfTI
            descrip); de-identification of a DICOM target.
        progress: Show tqdm bars over the window passes and the slabs.
        window: The source's ``intensity.default_window`` when the caller already has it (``medsr upscale``
            computes the percentiles for its input checks), saving the passes over the source; computed otherwise.
        consistency: MR in-plane k-space degradation whose measured band each output slice gets back from its input
            slice (``consistency.kspace_consistency``, slice by slice as in memory); None: off.
        dtype, display_range: NIfTI target only, as for ``write_volume``: 'input' stores the source NIfTI's integer
            type and scaling (known from its header before the first slab), clipped to the type's range.
        model, new_study, enhanced: DICOM target only, as for ``write_volume``: the derivation's model, a new
            study, one enhanced multi-frame file.
        floor: Output values below it (physical units) are raised to it before writing; None: none.

    Raises:
        ValueError: ``target`` is ``source``; the source is unreadable, truncated or holds a NaN/inf voxel (the
            message names the file and slice); the scale is not integer; the model output has several channels.
            Nothing is left at ``target``: the temporary file is removed.
    """
    volume = source if isinstance(source, VolumeFile) else open_volume(source)
    if modality is not None:
        volume = dataclasses.replace(volume, modality=Modality(modality))
    target = Path(target)
    check_output(target, [volume.path], force=True)
    scale = integer_scale(scale)
    if consistency is not None and (spatial_dims != 2 or scale[2] != 1):
        raise ValueError("k-space consistency streams only for 2D models upsampling in-plane")
    shape = tuple(n * s for n, s in zip(volume.spatial_shape, scale, strict=True))
    with volume_writer(
        target,
        spatial_shape=shape,
        affine=scale_affine(volume.affine, scale),
        modality=volume.modality,
        meta=volume.meta,
        description=description,
        anonymize=anonymize,
        dtype=dtype,
        display_range=display_range,
        model=model,
        new_study=new_study,
        enhanced=enhanced,
    ) as write:
        window = window or window_from_slices(
            volume.modality,
            lambda: progress_bar(
                volume.slices(), desc="window", total=volume.spatial_shape[2], leave=False, disable=not progress
            ),
        )
        tiling = volume_tiling(
            predictor,
            (1, *volume.spatial_shape),
            spatial_dims=spatial_dims,
            through_plane=spatial_dims == 2 and scale[2] != 1,
            tile=tile,
            overlap=overlap,
            memory=memory,
        )
        planes = _predict_slabs(
            predictor,
            volume,
            window,
            scale=scale,
            spatial_dims=spatial_dims,
            tiling=tiling,
            memory=memory,
            progress=progress,
            consistency=consistency,
        )
        for sr in planes:
            if sr.shape[0] != 1:
                raise ValueError(f"{target}: can only write single-channel volumes, the model gives {sr.shape[0]}")
            if not torch.isfinite(sr).all():
                raise ValueError(f"{target}: the model gives NaN or infinite values (broken weights?); nothing written")
            values = window.to_physical(sr)
            write((values if floor is None else values.clamp(min=floor))[0].numpy())


def _predict_slabs(
    predictor: Predictor,
    volume: VolumeFile,
    window: Window,
    *,
    scale: tuple[int, int, int],
    spatial_dims: int,
    tiling: Tiling,
    memory: float,
    progress: bool,
    consistency: Degradation | None = None,
) -> Iterator[torch.Tensor]:
    """``predict_volume`` of the normalised volume, run slab by slab along k with the whole volume's ``tiling``.

    Slabs are ``tiling.tile[2]`` slices: disjoint for a 2D model upsampling in-plane (the planes of one call), else
    the rows of tiles along k, overlapping by ``tiling.overlap[2]``. Each input slice is read once, in k order.

    Yields:
        Output planes (C, I * si, J * sj, n) float32 in [0, 1] window units, in k order.
    """
    size, depth, overlap = volume.spatial_shape[2], tiling.tile[2], tiling.overlap[2]
    starts = list(range(0, size, depth)) if overlap == 0 else tile_starts(size, depth, overlap)
    bounds = [*starts, size] if overlap == 0 else tile_bounds(starts, depth, size)
    lr, held = torch.zeros((1, *volume.spatial_shape[:2], 0)), 0  # normalised input slices [held, held + n)
    for index, start in enumerate(progress_bar(starts, desc="upscale", unit="slab", disable=not progress)):
        stop = min(start + depth, size)
        lr = lr[..., start - held :]  # slabs overlap: keep what this one shares with the last, read the rest
        new = torch.from_numpy(volume.read_slab(start + lr.shape[3], stop))
        lr, held = torch.cat([lr, window.to_unit(new)[None]], dim=-1), start
        sr = predict_volume(
            predictor,
            Volume(lr, volume.affine, volume.modality),
            scale=scale,
            spatial_dims=spatial_dims,
            tile=tiling.tile,
            overlap=tiling.overlap,
            memory=memory,
            progress=False,
        ).array
        if consistency is not None:  # in-plane: whole planes
            sr = kspace_consistency(Volume(sr, volume.affine), Volume(lr, volume.affine), consistency).array
        yield sr[..., (bounds[index] - start) * scale[2] : (bounds[index + 1] - start) * scale[2]]
