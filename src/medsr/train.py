"""Training: ``train_step`` holds the maths, ``fit`` the loop, checkpoints and metrics log.

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per validation), and the checkpoint
folders ``last/`` and ``best/`` (safetensors + JSON, see ``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import default_collate

from medsr.checkpoint import load_training_state, save_checkpoint
from medsr.config import Config, load_config, problem, short, to_dict
from medsr.data import (
    Pair,
    PairDataset,
    blurred,
    contrast_copies,
    find_scans,
    gamma_copies,
    prepare_scan,
    slice_range,
    split_scans,
    zoomed,
)
from medsr.degrade import Degradation
from medsr.evaluation import compare_methods
from medsr.infer import model_predictor, network_device, resolve_precision
from medsr.inputs import training_inputs
from medsr.io import read_volume, write_bytes
from medsr.losses import ADVERSARIAL, LOSSES, combined, discriminator_loss, generator_loss
from medsr.models import create_model, list_models
from medsr.models.discriminators import DISCRIMINATORS, create_discriminator
from medsr.models.registry import check_kwargs, check_signature
from medsr.perceptual import PerceptualLoss
from medsr.progress import progress_bar
from medsr.samples import resolve_scan
from medsr.shard import process_group, rank_device, ranks
from medsr.volume import Volume, integer_scale, swap_into_k

EPOCH_LENGTH = 1024  # patches per dataset epoch; an epoch only changes the patch seeds


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Pair,
    loss_fn: Callable,
    *,
    clip_grad_norm: float = 0.0,
    bf16: bool = False,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One optimisation step on a batch of (N, C, *spatial) pairs; returns the logged values.

    Args:
        clip_grad_norm: Rescale gradients whose global norm exceeds this (0: off).
        bf16: Run the forward pass under bfloat16 autocast (on the batch's device); the loss is computed in float32.
        ema: Averaged copy of the model, updated after the step.
    """
    model.train()
    with torch.autocast(batch.lr.device.type, dtype=torch.bfloat16, enabled=bf16):
        sr = model(batch.lr)
    loss = loss_fn(sr.float(), batch.hr)
    norm = _update(model, optimizer, loss, clip_grad_norm=clip_grad_norm, ema=ema)
    return {"loss": loss.item(), "grad_norm": norm}


def _update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    *,
    clip_grad_norm: float,
    ema: AveragedModel | None,
) -> float:
    """Backpropagate ``loss``, clip, step, update the EMA; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm if clip_grad_norm > 0 else math.inf)
    optimizer.step()
    if ema is not None:
        ema.update_parameters(model)
    return float(norm)


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    g_optimizer: torch.optim.Optimizer,
    d_optimizer: torch.optim.Optimizer,
    batch: Pair,
    pixel_loss: Callable,
    *,
    adversarial: str,
    adversarial_weight: float,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 0.0,
    clip_grad_norm: float = 0.0,
    bf16: bool = False,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One generator update, then one discriminator update (SRGAN/ESRGAN order); returns the logged values.

    The generator's loss is ``pixel + adversarial_weight * adversarial (+ perceptual_weight * perceptual)``: the
    pixel term keeps the output tied to HR (the adversarial term alone rewards any plausible anatomy).
    """
    generator.train()
    discriminator.train()
    autocast = torch.autocast(batch.lr.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        sr = generator(batch.lr).float()
        # Generator: be close to HR and fool D. D's weights get gradients here but are not stepped.
        fake_logits = discriminator(sr).float()
        with torch.no_grad():  # only RaGAN compares with the real batch; the others ignore it
            real_logits = discriminator(batch.hr).float() if adversarial == "ragan" else fake_logits.detach()
    pixel = pixel_loss(sr, batch.hr)
    adversarial_term = generator_loss(real_logits, fake_logits, adversarial)
    total = pixel + adversarial_weight * adversarial_term
    logs = {"loss/pixel": pixel.item(), "loss/adversarial": adversarial_term.item()}
    if perceptual is not None:
        perceptual_term = perceptual(sr, batch.hr)
        total = total + perceptual_weight * perceptual_term
        logs["loss/perceptual"] = perceptual_term.item()
    norm = _update(generator, g_optimizer, total, clip_grad_norm=clip_grad_norm, ema=ema)
    # Discriminator: real HR -> real, generated (detached, so G gets no gradient) -> fake.
    with autocast:
        real_logits, fake_logits = discriminator(batch.hr).float(), discriminator(sr.detach()).float()
    d_loss = discriminator_loss(real_logits, fake_logits, adversarial)
    d_optimizer.zero_grad(set_to_none=True)  # also clears the gradients G's loss left on D
    d_loss.backward()
    d_optimizer.step()
    return {"loss": total.item(), "grad_norm": norm, **logs, "loss/d": d_loss.item()}


def _optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    if config.train.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.train.lr)


def _schedule(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor per step: cosine decay to zero (Loshchilov & Hutter 2017), step decay, or constant."""
    train = config.train
    factors = {
        "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * step / train.steps)),
        "step": lambda step: train.step_gamma ** (step // train.step_every),
        "constant": lambda step: 1.0,
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[train.schedule])


def training_scans(config: Config) -> tuple[list[Path], list[Path], list[Path]]:
    """Train, validation and test scan paths: folders expand to the scans inside them.

    With ``data.split == 'region'`` every scan is in all three (each split along ``data.split_axis`` by the slice
    ranges); with 'scan', whole scans are split by :func:`data.split_scans`, reproducibly from ``train.seed``.
    """
    paths = []
    for scan in config.data.scans:
        path = resolve_scan(scan)
        paths += [p.resolve() for p in find_scans(path)] if path.is_dir() else [path]  # a series folder: itself
    if config.data.split == "region":
        return paths, paths, paths
    return split_scans(paths, fractions=config.data.fractions, seed=config.train.seed)


def load_scans(paths: list[Path], config: Config) -> list[Volume]:
    """HR scans prepared as ``data.prepare_scan`` does (cropped, normalised with the LR window)."""
    return [prepare_scan(read_volume(path, modality=config.data.modality), config.degradation) for path in paths]


def check_config(config: Config) -> None:
    """Refuse configs that would fail late, leak or train nothing, naming the field: numbers out of range, an
    unknown model or model kwargs, disjoint slice regions, a model scale matching the data."""
    if config.train.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.train.loss!r}; choose one of {sorted(LOSSES)}")
    train, data = config.train, config.data
    if train.optimizer not in ("adam", "adamw") or train.schedule not in ("cosine", "step", "constant"):
        raise ValueError(
            f"train.optimizer must be adam or adamw, train.schedule cosine, step or constant; got "
            f"{train.optimizer!r}, {train.schedule!r}"
        )
    if train.schedule == "step" and train.step_every < 1:
        raise ValueError("train.schedule 'step' needs train.step_every >= 1")
    ranges = [  # (field, value, whether it is in range, the range); floats are finite already (config._cast)
        ("train.steps", train.steps, train.steps >= 1, ">= 1"),
        ("train.val_every", train.val_every, train.val_every >= 1, ">= 1"),
        ("train.lr", train.lr, train.lr > 0, "> 0"),
        ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, ">= 0"),
        ("train.ema_decay", train.ema_decay, 0 <= train.ema_decay < 1, "in [0, 1) (0: off)"),
        ("train.clip_grad_norm", train.clip_grad_norm, train.clip_grad_norm >= 0, ">= 0 (0: off)"),
        ("train.step_every", train.step_every, train.step_every >= 0, ">= 0"),
        ("train.step_gamma", train.step_gamma, train.step_gamma > 0, "> 0"),
        ("train.threads", train.threads, 0 <= train.threads <= 1024, "in [0, 1024] (0: torch's default)"),
        ("train.seed", train.seed, 0 <= train.seed < 2**63, "in [0, 2**63)"),
        ("data.scans", data.scans, len(data.scans) >= 1, "at least one scan"),
        ("data.batch_size", data.batch_size, data.batch_size >= 1, ">= 1"),
        ("data.patch", data.patch, min(data.patch, default=0) >= 1, "sizes >= 1"),
        ("data.min_foreground", data.min_foreground, 0 <= data.min_foreground <= 1, "in [0, 1]"),
        (
            "data.gamma",
            data.gamma,
            len(data.gamma) == 2 and 0 < data.gamma[0] <= data.gamma[1],
            "[low, high], 0 < low <= high",
        ),
        ("data.contrasts", data.contrasts, 0 <= data.contrasts <= 50, "in [0, 50] (0: off)"),
        ("data.zooms", data.zooms, bool(data.zooms) and all(0.25 <= z <= 4 for z in data.zooms), "in [0.25, 4]"),
        ("data.blurs", data.blurs, bool(data.blurs) and all(0 <= b <= 4 for b in data.blurs), "sigmas in [0, 4]"),
        ("model.spatial_dims", config.model.spatial_dims, config.model.spatial_dims in (2, 3), "2 or 3"),
    ]
    ranges += [
        (f"data.{name}_slices", (start, stop), 0 <= start < stop, "[start, stop) with 0 <= start < stop")
        for name, (start, stop) in (("train", data.train_slices), ("val", data.val_slices), ("test", data.test_slices))
    ]
    for field, value, ok, expected in ranges:
        if not ok:
            raise ValueError(f"{field} must be {expected}, got {short(repr(value))}")
    reserved = sorted({"spatial_dims", "scale"} & set(config.model.kwargs))
    if reserved:
        raise ValueError(f"model.kwargs: set {', '.join(reserved)} as model.spatial_dims and model.scale, not here")
    field = "model.kwargs" if config.model.name in list_models() else "model.name"
    try:  # names, types and bounds, before anything is built (create_model also bounds the network's size)
        check_kwargs(config.model.name, config.model.kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field}: {problem(error)}") from error
    if config.train.loss_terms:
        combined(config.train.loss_terms)  # raises on unknown names or bad weights, before any data is loaded
    gan = config.gan
    if gan.discriminator and (
        gan.discriminator not in DISCRIMINATORS
        or gan.adversarial not in ADVERSARIAL
        or not 1 <= gan.pretrain_steps < train.steps
        or min(gan.adversarial_weight, gan.d_lr, gan.perceptual_weight) <= 0
    ):
        raise ValueError(
            f"gan: discriminator one of {sorted(DISCRIMINATORS)}, adversarial one of {ADVERSARIAL}, "
            f"1 <= pretrain_steps < train.steps (psnr/ is saved there), weights and d_lr > 0; got {gan}"
        )
    if gan.discriminator:
        if "in_channels" in gan.discriminator_kwargs:
            raise ValueError("gan.discriminator_kwargs: in_channels is the model's (model.kwargs.in_channels)")
        try:
            check_signature(DISCRIMINATORS[gan.discriminator], gan.discriminator_kwargs, gan.discriminator)
        except (TypeError, ValueError) as error:
            raise ValueError(f"gan.discriminator_kwargs: {problem(error)}") from error
    if gan.perceptual_weights and not (gan.discriminator and Path(gan.perceptual_weights).is_file()):
        raise ValueError(
            f"gan.perceptual_weights {gan.perceptual_weights!r}: needs gan.discriminator and an existing file"
        )
    if config.data.split not in ("region", "scan") or config.data.split_axis not in (0, 1, 2):
        raise ValueError(
            f"data.split must be 'region' or 'scan' and data.split_axis 0, 1 or 2 (i, j, k); got "
            f"{config.data.split!r}, {config.data.split_axis!r}"
        )
    axes = config.data.slice_axes
    if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"data.slice_axes {axes!r}: distinct axes among 0 (i), 1 (j) and 2 (k)")
    axis = config.data.held_out_slice_axis
    if axis not in (0, 1, 2) or (axis != 2 and config.degradation.factors[2] == 1):
        raise ValueError(f"data.held_out_slice_axis {axis!r}: 2 (k), or 0 (i) or 1 (j) for a through-plane model")
    regions = {"train": config.data.train_slices, "val": config.data.val_slices, "test": config.data.test_slices}
    for (name_a, (start_a, stop_a)), (name_b, (start_b, stop_b)) in itertools.combinations(regions.items(), 2):
        if start_a < stop_b and start_b < stop_a:
            raise ValueError(
                f"data.{name_a}_slices {(start_a, stop_a)} overlap data.{name_b}_slices "
                f"{(start_b, stop_b)}: the model would be scored on what it saw"
            )
    factors = integer_scale(config.degradation.factors)
    through_plane = config.model.spatial_dims == 2 and factors[2] != 1
    if through_plane and factors[:2] != (1, 1):
        raise ValueError(
            f"degradation.factors {factors}: a 2D model learns in-plane (a, b, 1) or through-plane (1, 1, c) "
            "factors; use model.spatial_dims 3 for both at once"
        )
    expected = (1, factors[2]) if through_plane else factors[: config.model.spatial_dims]
    if tuple(config.model.scale) != expected:
        raise ValueError(f"model.scale {config.model.scale} must equal the degradation factors {expected}")


def batches(
    dataset: PairDataset, batch_size: int, start_step: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[Pair]:
    """Batch ``t`` is items ``t * batch_size ...`` of the endless stream; a resumed run replays it exactly.

    Under DDP each of ``world_size`` processes takes every ``world_size``-th item of the same global batch
    (``batch_size`` is the global batch), so the processes together see exactly what one process would.
    """
    position = start_step * batch_size
    while True:
        items = []
        for offset in range(batch_size):
            if offset % world_size == rank:
                dataset.set_epoch((position + offset) // len(dataset))
                items.append(dataset[(position + offset) % len(dataset)])
        position += batch_size
        yield default_collate(items)


def describe(
    config: Config,
    step: int,
    scores: dict[str, Any],
    scans: tuple[list[Path], list[Path], list[Path]],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint's JSON description: enough to rebuild the model and to know what it is for.

    ``scans`` (train, validation, test paths, resolved) is saved as used, so evaluation can refuse every scan or
    slab the model saw without rebuilding the split from a folder that may have changed since. ``inputs`` is
    the training scans' LR spacing and intensity range (``inputs.training_inputs``), for ``medsr upscale``'s
    warnings.
    """
    return {
        "model_name": config.model.name,
        "model_kwargs": {
            "spatial_dims": config.model.spatial_dims,
            "scale": list(config.model.scale),
            **config.model.kwargs,
        },
        "modality": config.data.modality,
        "scale": list(integer_scale(config.degradation.factors)),
        "degradation": to_dict(config)["degradation"],
        "intensity": (
            "normalised per LR scan: 0.5th percentile -> 0, 99.9th -> 1 (CT: -1024..3071 HU -> 0..1, below -1024 HU "
            "raised to -1024)"
        ),
        "config": to_dict(config),
        "step": step,
        "scores": scores,
        "scans": {name: [str(p) for p in paths] for name, paths in zip(("train", "val", "test"), scans, strict=True)},
        "inputs": inputs,
    }


def fit(
    config: Config | None, run_dir: Path, *, resume: bool = False, progress: bool = True, device: str = "auto"
) -> dict[str, Any]:
    """Train into ``run_dir``, from scratch or resuming its last checkpoint; returns the best validation row.

    Validation runs every ``train.val_every`` steps on held-out data (the ``data.val_slices`` region, or the
    validation scans); then ``last/`` is saved with the optimiser and schedule state, and ``best/`` keeps the
    weights with the highest validation PSNR. A run killed at any point resumes from ``last/`` with the same
    batches it would have drawn (``batches`` replays the stream from the saved step), so with a fixed seed the
    resumed run ends with the weights of an uninterrupted one.

    With ``gan.discriminator`` set, steps after ``gan.pretrain_steps`` are :func:`gan_step` s; the generator at the
    end of pre-training is saved in ``psnr/`` (for network interpolation, :func:`checkpoint.interpolate`), and in
    the adversarial phase ``best/`` follows the latest validation (a GAN is not chosen by its PSNR). The
    discriminator and its optimiser are part of ``last/``'s training state.

    Args:
        config: The run's config; ignored when resuming (the run's own ``config.yaml`` is used).
        run_dir: The run folder.
        resume: Continue the run in ``run_dir``.
        device: 'auto' (the GPU when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps'; under ``torchrun``, 'auto'
            and 'cuda' are each process's own GPU (``shard.rank_device``). DDP joins with NCCL on CUDA, gloo
            on the CPU; 'mps' runs in one process only. ``train.bf16`` holds on the CPU, and on a GPU where it runs
            bfloat16 natively.
    """
    where = rank_device(device)  # a device this machine lacks: refused before any work
    if where.type == "mps" and ranks().world_size > 1:
        raise ValueError(
            "device 'mps' under torchrun: DDP has no backend for Apple GPUs; use one process or --device cpu"
        )
    if resume:
        config = load_config(run_dir / "config.yaml")
    elif (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir}: holds a previous run; choose another --out, or --resume it")
    check_config(config)
    last = run_dir / "last" if (run_dir / "last").exists() else run_dir / "last.old"  # see _save_last
    resumed = load_training_state(last) if resume else None  # a broken or hostile state: refused before any work
    if where.type == "cuda":
        torch.cuda.set_device(where)  # NCCL's device for this process
    with process_group("nccl" if where.type == "cuda" else "gloo") as place:
        rank, world_size = place.rank, place.world_size
        if config.data.batch_size % world_size:
            raise ValueError(f"data.batch_size {config.data.batch_size} must divide among {world_size} processes")
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        data = _training_data(config)
        nets = _networks(config, world_size, where)
        # The folder is made only now: a config, scan or model that fails above leaves nothing behind.
        with _run_folder(run_dir, config, resume=resume, rank=rank):
            start, best = _restore(last, *resumed, nets, rank=rank) if resume else (0, {"psnr": -math.inf})
            # DDP averages gradients over processes: with equal shares of the global batch, one process's update.
            ids = [where.index] if where.type == "cuda" else None
            trained = nn.parallel.DistributedDataParallel(nets.model, ids) if world_size > 1 else nets.model
            loss_fn = combined(config.train.loss_terms) if config.train.loss_terms else LOSSES[config.train.loss]
            stream = batches(data.dataset, config.data.batch_size, start, rank=rank, world_size=world_size)
            steps, quiet = range(start + 1, config.train.steps + 1), not progress or rank > 0
            bar = progress_bar(steps, desc="train", unit="step", initial=start, total=config.train.steps, disable=quiet)
            with _log_file(run_dir, resume, rank) as log:
                for step in bar:
                    adversarial_phase = nets.discriminator is not None and step > config.gan.pretrain_steps
                    batch = Pair._make(tensor.to(where) for tensor in next(stream))
                    logs = _step(trained, nets, batch, loss_fn, config, adversarial=adversarial_phase)
                    nets.schedule.step()
                    if nets.discriminator is not None and step == config.gan.pretrain_steps and rank == 0:  # PSNR
                        description = describe(config, step, {}, data.split, data.inputs)
                        save_checkpoint(run_dir / "psnr", nets.final, description)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
                    if world_size > 1:  # log the global batch's loss, as one process would see it
                        loss = torch.tensor(logs["loss"], device=where)
                        dist.all_reduce(loss)
                        logs["loss"] = float(loss) / world_size
                    if step % config.train.val_every and step != config.train.steps:
                        continue
                    if rank == 0:
                        row, best = _validate_and_save(
                            run_dir, nets, data, config, step, logs, best, log, adversarial_phase
                        )
                        bar.write(f"step {step}: val PSNR {row['psnr']:.2f} dB (bicubic {row['psnr_cubic']:.2f})")
                    if world_size > 1:
                        dist.barrier()  # the other ranks wait while rank 0 validates and saves
    return best


class _Data(NamedTuple):
    """A run's data: training pairs, validation volumes and region, the split and the training-inputs record."""

    dataset: PairDataset
    val_volumes: list[Volume]
    val_slices: tuple[int, int] | None
    split: tuple[list[Path], list[Path], list[Path]]
    inputs: dict[str, Any]


def _training_data(config: Config) -> _Data:
    """Load and check the training and validation scans (held-out scans must not be among them, and training-only
    scans must not be validated or scored)."""
    split = training_scans(config)
    train_paths, val_paths, test_paths = split
    held_out = {resolve_scan(scan) for scan in config.data.held_out_scans}
    seen = sorted(held_out & {*train_paths, *val_paths})
    if seen:
        raise ValueError(f"data.held_out_scans {[str(p) for p in seen]} are also training or validation scans")
    extra_paths = [resolve_scan(scan) for scan in config.data.extra_train_scans]
    scored = sorted(set(extra_paths) & (held_out | {*val_paths, *test_paths}))
    if scored:
        raise ValueError(f"data.extra_train_scans {[str(p) for p in scored]} are also validated or scored")
    volumes = load_scans(train_paths, config)
    by_region = config.data.split == "region"
    val_volumes = volumes if by_region else load_scans(val_paths, config)
    extra = load_scans(extra_paths, config)
    slices = config.data.train_slices if by_region else None
    axis = config.data.split_axis
    regions = [v if slices is None else slice_range(v, slices=slices, axis=axis) for v in volumes] + extra
    turned = [swap_into_k(region, a) for region in regions for a in config.data.slice_axes]  # the training regions
    sizes = [zoomed(region, zoom) for region in turned for zoom in config.data.zooms]
    spacings = [v.meta["lr_spacing"] for v in volumes + extra]  # and the LR voxels of the turned and zoomed copies:
    factors = integer_scale(config.degradation.factors)
    spacings += [[s * f for s, f in zip(region.spacing, factors, strict=True)] for region in sizes]
    inputs = training_inputs(spacings, [v.meta["lr_range"] for v in volumes + extra])
    rng = np.random.default_rng(config.train.seed)  # the contrast curves, drawn region by region
    curves = [
        copy
        for region in sizes
        for copy in gamma_copies(region, config.data.gamma) + contrast_copies(region, config.data.contrasts, rng)
    ]
    augmented = [blurred(copy, sigma) for copy in curves for sigma in config.data.blurs]
    dataset = PairDataset(
        augmented,
        config.degradation,
        patch=config.data.patch,
        length=EPOCH_LENGTH,
        seed=config.train.seed,
        min_foreground=config.data.min_foreground,
        spatial_dims=config.model.spatial_dims,
    )
    return _Data(dataset, val_volumes, config.data.val_slices if by_region else None, split, inputs)


@dataclasses.dataclass
class _Networks:
    """What a run trains: the model, its optimiser, schedule and EMA, and for a GAN the discriminator, its optimiser
    and the perceptual loss. ``final`` is what is validated and saved (the EMA average when there is one). ``bf16``:
    whether forward passes run under bfloat16 autocast (``train.bf16`` where the device runs it natively)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    bf16: bool = False
    ema: AveragedModel | None = None
    discriminator: nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    perceptual: nn.Module | None = None

    @property
    def final(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def _networks(config: Config, world_size: int, device: torch.device) -> _Networks:
    """Build the networks and optimisers of a run on ``device`` (in this order: the seeded initial weights depend on
    it; they are made on the CPU, so they are the same on every device)."""
    model = create_model(
        config.model.name, spatial_dims=config.model.spatial_dims, scale=config.model.scale, **config.model.kwargs
    )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model {config.model.name!r} has no trainable parameters (an interpolation baseline)")
    model = model.to(device)
    optimizer = _optimizer(model, config)
    # On the CPU train.bf16 holds as configured (the recipe's precision on any CPU); on a GPU where it is native.
    native = device.type == "cpu" or resolve_precision("auto", device) == "bf16"
    nets = _Networks(model, optimizer, _schedule(optimizer, config), bf16=config.train.bf16 and native)
    if config.train.ema_decay:
        nets.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay))
    gan = config.gan
    if gan.discriminator:
        if world_size > 1:
            raise ValueError("GAN training runs in one process: torchrun with gan.discriminator is not supported")
        channels = config.model.kwargs.get("in_channels", 1)
        nets.discriminator = create_discriminator(
            gan.discriminator, config.model.spatial_dims, in_channels=channels, **gan.discriminator_kwargs
        ).to(device)
        nets.d_optimizer = torch.optim.Adam(nets.discriminator.parameters(), lr=gan.d_lr, betas=(0.9, 0.99))  # ESRGAN
        if gan.perceptual_weights:
            nets.perceptual = PerceptualLoss(gan.perceptual_weights, layer=gan.perceptual_layer).to(device)
    return nets


def _step(trained: nn.Module, nets: _Networks, batch: Pair, loss_fn: Callable, config: Config, *, adversarial: bool):
    """One :func:`gan_step` (adversarial phase) or :func:`train_step` of ``trained`` (the model, or its DDP wrapper)."""
    common = {"clip_grad_norm": config.train.clip_grad_norm, "bf16": nets.bf16, "ema": nets.ema}
    if not adversarial:
        return train_step(trained, nets.optimizer, batch, loss_fn, **common)
    gan = config.gan
    return gan_step(
        trained,
        nets.discriminator,
        nets.optimizer,
        nets.d_optimizer,
        batch,
        loss_fn,
        adversarial=gan.adversarial,
        adversarial_weight=gan.adversarial_weight,
        perceptual=nets.perceptual,
        perceptual_weight=gan.perceptual_weight,
        **common,
    )


def _validate_and_save(
    run_dir: Path,
    nets: _Networks,
    data: _Data,
    config: Config,
    step: int,
    logs: dict[str, float],
    best: dict,
    log: TextIO,
    adversarial_phase: bool,
) -> tuple[dict, dict]:
    """Validate, log the row, save ``best/`` when it improves (a GAN: always, its latest) and ``last/`` with the
    training state; returns (this validation's row, the best row)."""
    row = validate(
        nets.final,
        data.val_volumes,
        config.degradation,
        data.val_slices,
        config.model.spatial_dims,
        bf16=nets.bf16,
        axis=config.data.split_axis,
    )
    row.update(step=step, loss=logs["loss"], lr=nets.schedule.get_last_lr()[0])
    precision = "bf16" if nets.bf16 else "fp32"
    row.update(device=str(network_device(nets.model)), processes=ranks().world_size, precision=precision)
    row.update({key: value for key, value in logs.items() if key.startswith("loss/")})
    log.write(json.dumps(row) + "\n")
    log.flush()
    description = describe(config, step, {"validation": row}, data.split, data.inputs)
    if row["psnr"] > best["psnr"] or adversarial_phase:  # a GAN is not chosen by PSNR: its latest
        best = row
        save_checkpoint(run_dir / "best", nets.final, description)
    state = {"optimizer": nets.optimizer.state_dict(), "schedule": nets.schedule.state_dict(), "step": step}
    state["best"] = best
    if nets.ema is not None:  # the checkpoint holds the average: keep the raw weights to go on training
        state |= {"model": nets.model.state_dict(), "ema": nets.ema.state_dict()}
    if nets.discriminator is not None:
        state |= {"discriminator": nets.discriminator.state_dict(), "d_optimizer": nets.d_optimizer.state_dict()}
    _save_last(run_dir, nets.final, description, state)
    return row, best


@contextlib.contextmanager
def _run_folder(run_dir: Path, config: Config, *, resume: bool, rank: int) -> Iterator[None]:
    """Make the run folder and write its config.yaml (rank 0, new runs); a new run that fails before its first
    checkpoint (disk full, Ctrl-C, SIGTERM) removes the folder again: nothing half-made is left."""
    new = not resume and not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not resume and rank == 0:
            write_bytes(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
        yield
    except BaseException:
        if new and rank == 0 and not (run_dir / "last").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def _log_file(run_dir: Path, resume: bool, rank: int) -> Iterator[TextIO | None]:
    """``metrics.jsonl`` for rank 0 (appended to when resuming; new otherwise), nothing for other ranks."""
    if rank > 0:
        yield None
        return
    with (run_dir / "metrics.jsonl").open("a" if resume else "x") as log:
        yield log


def _save_last(run_dir: Path, model: nn.Module, description: dict[str, Any], state: dict[str, Any]) -> None:
    """Replace ``last/`` as a whole: write ``last.tmp/``, then swap folders. A kill between the two renames
    leaves ``last.old/``, which :func:`_restore` falls back to."""
    last, tmp, old = run_dir / "last", run_dir / "last.tmp", run_dir / "last.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, description, state)
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)


def _restore(
    last: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], nets: _Networks, *, rank: int = 0
) -> tuple[int, dict]:
    """Load ``last/`` (``checkpoint.load_training_state``'s weights and state) into the model, optimiser, schedule,
    EMA and GAN discriminator; drop log rows written after it. Nothing is written unless all of it loads.

    Returns (step, best validation row).
    """
    step = state["step"]
    log = last.parent / "metrics.jsonl"
    try:
        nets.model.load_state_dict(state["model"] if nets.ema is not None else weights)
        if nets.ema is not None:
            nets.ema.load_state_dict(state["ema"])
        nets.optimizer.load_state_dict(state["optimizer"])
        nets.schedule.load_state_dict(state["schedule"])
        if nets.discriminator is not None:
            nets.discriminator.load_state_dict(state["discriminator"])
            nets.d_optimizer.load_state_dict(state["d_optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        missing = f"no {error}" if isinstance(error, KeyError) else problem(error)
        raise ValueError(f"{last}: cannot resume this run's network and optimiser from it ({missing})") from error
    # A kill between logging a validation and saving its checkpoint leaves a row the resumed run will write again.
    if rank == 0:  # the log is rank 0's
        lines = log.read_text().splitlines()
        try:
            rows = [line for line in lines if json.loads(line)["step"] <= step]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{log}: not a metrics log (each line a JSON object with a step)") from error
        log.write_text("".join(f"{row}\n" for row in rows))
    return step, state["best"]


def validate(
    model: nn.Module,
    volumes: list[Volume],
    degradation: Degradation,
    slices: tuple[int, int] | None,
    spatial_dims: int = 2,
    *,
    bf16: bool = False,
    axis: int = 2,
) -> dict:
    """Validation PSNR/SSIM of the model, and bicubic's PSNR, averaged over the HR slices of the validation slab
    (``slices`` along ``axis``) of every scan (``slices`` None: all of each scan); a 3D model runs on the whole
    slab. Inference runs in the precision of training (``bf16``), so the best checkpoint does not depend on the
    machine validating it."""
    predictor = model_predictor(model, precision="bf16" if bf16 else "fp32")
    rows = [
        row
        for index, v in enumerate(volumes)
        for row in compare_methods(
            v,
            degradation,
            {"model": predictor},
            slices=slices or (0, v.spatial_shape[axis]),
            spatial_dims=spatial_dims,
            seed=index,
            axis=axis,
        ).rows
    ]

    def mean(method: str, key: str) -> float:
        values = [row[key] for row in rows if row["method"] == method]
        return sum(values) / len(values)

    return {key: mean("model", key) for key in ("psnr", "ssim", "psnr_body", "ssim_body")} | {
        "psnr_cubic": mean("cubic", "psnr")
    }
