"""Typed training configuration: dataclasses loaded from YAML, with ``section.key=value`` overrides.

Unknown keys are errors; values are cast to the field's type, so ``train.lr=5e-5`` works from the command line.
The training configs of the shipped models are package data (``medsr/configs/NAME.yaml``; ``configs/`` in a
checkout links there): :func:`load_config` takes their names too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medsr.degrade import Degradation

MAX_FILE_BYTES = 1_000_000  # a config or model description; real ones are a few kB
SHIPPED_CONFIGS = "configs"  # the folder of the shipped training configs inside the medsr package


@dataclasses.dataclass
class ModelConfig:
    name: str = "edsr_small"
    spatial_dims: int = 2
    scale: tuple[int, ...] = (2, 2)  # per spatial axis of the model's input
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    scans: tuple[str, ...] = ("colin27",)  # sample names (see `medsr samples`), scan paths, or folders of scans
    modality: str = "MR"
    # 'region': every scan is split along split_axis by the slices below. 'scan': whole scans go to train/val/test
    # (data.split_scans with `fractions` and train.seed); the slices are then unused.
    split: str = "region"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Region split ([start, stop) along split_axis: 0 = i, 1 = j, 2 = k, axial slices): never evaluate on what the
    # model trained on. A 2D image (K = 1) is split along i or j.
    split_axis: int = 2
    train_slices: tuple[int, int] = (20, 90)
    val_slices: tuple[int, int] = (95, 105)
    test_slices: tuple[int, int] = (110, 150)
    held_out_scans: tuple[str, ...] = ()  # other scans never trained or validated on, scored whole (model tables)
    # The axis of each held-out scan a through-plane model thins out and restores: 2 = k; 1 = j, to score single
    # coronal or sagittal images (rows head to foot) of other subjects when no thin-slice volume of them exists.
    held_out_slice_axis: int = 2
    patch: tuple[int, ...] = (96,)  # HR patch size in voxels: one edge for every axis, or one per model axis
    batch_size: int = 16
    min_foreground: float = 0.3  # fraction of patch voxels above 5 % of the window, so patches are not mostly air
    # Intensity augmentation: each training scan also at 5 gammas, log-spaced in [low, high], applied to its
    # normalised intensities before the LR is simulated (so a T1 model meets other contrast curves). (1, 1): off.
    gamma: tuple[float, float] = (1.0, 1.0)
    # Contrast augmentation: each training region also with this many random smooth intensity curves, not
    # necessarily monotonic (data.contrast_copies: tissues swap brightness as between T1, T2 and PD). 0: off.
    contrasts: int = 0
    extra_train_scans: tuple[str, ...] = ()  # whole scans used for training only: never validated or scored
    # The axes each training region is also turned to put into k (volume.swap_into_k, as evaluation.reference_scan
    # does). Through-plane models: the axes thinned out, (0, 1, 2) also learns thick slices across i and j, so
    # anatomy in every direction is seen (SMORE's idea, here on the training scans). In-plane models: the planes
    # learnt on, (0, 1, 2) adds sagittal and coronal planes to axial ones. (2,): k only.
    slice_axes: tuple[int, ...] = (2,)
    # Voxel-size augmentation: each training region also on grids this many times coarser (data.zoomed), so a model
    # meets anatomy, blur and noise grain at other scanners' voxel sizes; below 1, finer grids interpolated by
    # zero-filled k-space (an MR scanner's "ZIP"). (1.0,): off.
    zooms: tuple[float, ...] = (1.0,)
    # Smoothness augmentation: each training copy (after the gammas) also blurred by a Gaussian of these sigmas in
    # voxels (data.blurred), for scans whose voxels are finer than their resolution. (0.0,): off.
    blurs: tuple[float, ...] = (0.0,)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 3000
    lr: float = 5e-4
    loss: str = "l1"  # one of medsr.losses.LOSSES: l1, mse, charbonnier, ssim, gradient, frequency
    loss_terms: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # weighted sum instead, e.g. {l1: 1, ssim: 0.1}
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    schedule: str = "cosine"  # cosine (to zero over `steps`) | step (x step_gamma every step_every) | constant
    step_every: int = 0
    step_gamma: float = 0.5
    clip_grad_norm: float = 0.0  # max global gradient norm; 0: off
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.999); checkpoints hold the EMA
    bf16: bool = False  # bfloat16 autocast for the forward pass (about 2x faster on recent CPUs)
    seed: int = 0
    val_every: int = 250
    threads: int = 0  # 0: leave torch's default


@dataclasses.dataclass
class GanConfig:
    """Adversarial fine-tuning (SRGAN/ESRGAN): ``pretrain_steps`` of the pixel loss alone (the PSNR-oriented
    generator, saved in ``psnr/``), then generator and discriminator steps in turn, the pixel loss kept."""

    discriminator: str = ""  # '' trains without a GAN; vgg | patchgan | unet (models.discriminators)
    discriminator_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    adversarial: str = "ragan"  # vanilla | ragan | hinge (losses.ADVERSARIAL)
    adversarial_weight: float = 5e-3  # ESRGAN's, next to a pixel loss of weight 1
    perceptual_weights: str = ""  # a VGG-19 safetensors file (medsr.perceptual); '' = no perceptual term
    perceptual_weight: float = 1.0
    perceptual_layer: int = 34
    pretrain_steps: int = 0
    d_lr: float = 1e-4


@dataclasses.dataclass
class CardConfig:
    """What the model card says beyond the measurements: what the model is for and where it stops working."""

    intended_use: str = ""
    limits: tuple[str, ...] = ()


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    degradation: Degradation = dataclasses.field(default_factory=Degradation)  # the LR simulation, as saved
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    gan: GanConfig = dataclasses.field(default_factory=GanConfig)
    card: CardConfig = dataclasses.field(default_factory=CardConfig)


def shipped_configs() -> list[str]:
    """The names of the training configs shipped with medsr, sorted.

    >>> "edsr_mr_x2" in shipped_configs()
    True
    """
    folder = importlib.resources.files("medsr").joinpath(SHIPPED_CONFIGS)
    if not folder.is_dir():
        return []
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config(path: Path | str) -> Path:
    """The config file at ``path``; where there is no such file, the shipped config of that name (``NAME``,
    ``NAME.yaml`` or a checkout's ``configs/NAME.yaml``). A ValueError listing the shipped names for any other
    missing file.

    >>> resolve_config("edsr_mr_x2").name
    'edsr_mr_x2.yaml'
    """
    path = Path(path)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError:  # e.g. a name too long: reading it says so
        return path
    name = path.name.removesuffix(".yaml")
    if not is_file and path.parent.as_posix() in (".", SHIPPED_CONFIGS) and name in shipped_configs():
        shipped = importlib.resources.files("medsr").joinpath(SHIPPED_CONFIGS, f"{name}.yaml")
        return Path(str(shipped))  # a plain file: setuptools installs package data unzipped
    if not exists:
        names = ", ".join(shipped_configs())
        raise ValueError(f"{path}: cannot read config (no such file, and no shipped config of that name: {names})")
    return path


def load_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (or the shipped config of that name, :func:`resolve_config`),
    then ``section.key=value`` overrides (YAML-parsed values).

    >>> load_config("edsr_mr_x2", ["train.steps=10"]).train.steps
    10
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            raw = _parse_yaml(read_limited(path)) or {}
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read config ({problem(error)})") from error
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"override {short(repr(override))} is not of the form section.key=value")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ValueError(
                f"override {short(repr(override))}: section {section!r} is not a mapping in the config file"
            )
        try:
            raw[section][name] = _parse_yaml(value)
        except ValueError as error:
            raise ValueError(f"override {short(repr(override))}: value is not valid YAML ({error})") from error
    return _build(Config, raw, "config")


def read_limited(path: Path) -> bytes:
    """The bytes of a config or model description; a ValueError over :data:`MAX_FILE_BYTES` (never read whole)."""
    with path.open("rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES:,} bytes")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a few lines of them expand to billions of values."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)


def _parse_yaml(text: str | bytes) -> Any:
    """Safe YAML without aliases; a one-line ValueError (problem, line, column) for text that is not."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(short(f"{error.problem or error.context}{where}")) from error
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # bad bytes, a 5000-digit int, deep nesting
        raise ValueError(short(str(error))) from error


def problem(error: Exception) -> str:
    """An exception in a few words for a message that already names the file (an OSError's without the path)."""
    return short(error.strerror if isinstance(error, OSError) and error.strerror else str(error), 200)


def short(text: str, limit: int = 100) -> str:
    """``text`` on one line and at most ``limit`` characters: user data and library errors in error messages."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_from_dict(raw: dict[str, Any]) -> Config:
    """The inverse of :func:`to_dict` (e.g. the config saved in a checkpoint), with the same checks as YAML."""
    return _build(Config, raw, "config")


def to_dict(config: Config) -> dict[str, Any]:
    """Plain data (lists, not tuples) for JSON/YAML and checkpoints."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {short(repr(raw))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        raise ValueError(f"{where}: unknown keys for {cls.__name__}: {short(repr(unknown))}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}.{name}")
        else:
            values[name] = _cast(value, hint, f"{where}.{name}")
    return cls(**values)


def _cast(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            if not isinstance(value, list | tuple):
                value = [value]
            item_types = typing.get_args(hint)
            if len(item_types) == 2 and item_types[1] is Ellipsis:
                return tuple(_cast(v, item_types[0], where) for v in value)
            if len(value) != len(item_types):
                raise ValueError(f"expected {len(item_types)} values")
            return tuple(_cast(v, t, where) for v, t in zip(value, item_types, strict=True))
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return dict(value)
        if (hint is bool) != isinstance(value, bool):  # bool is an int subclass: true would pass as 1
            raise ValueError("expected true or false" if hint is bool else f"expected a {hint.__name__}")
        if value is None or (hint is str and not isinstance(value, str)):
            raise ValueError(f"expected a {hint.__name__}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        cast = hint(value)
        if hint is float and not math.isfinite(cast):
            raise ValueError("expected a finite number")
        return cast
    except (TypeError, ValueError, OverflowError) as error:  # OverflowError: an int beyond any float
        raise ValueError(f"{where}: cannot use {short(repr(value))} ({short(str(error))})") from error
