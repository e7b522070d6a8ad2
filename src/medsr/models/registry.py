"""The model registry: named variant functions (as in timm), registered by explicit import in ``__init__``.

Kwargs come from configs and model descriptions, so :func:`create_model` checks them against the architecture's
constructor before building, and stops a build that grows past :data:`MAX_VALUES` or :data:`MAX_TENSORS`.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from medsr.config import short

MAX_INT = 4096  # any int kwarg: channels, blocks, kernel sizes, scale factors
MAX_VALUES = 2**28  # weights and buffers of one model: 1 GiB of float32 (the paper's 3D RCAN has 46M values)
MAX_TENSORS = 10_000  # bounds the time a deep network takes to build (the paper's RCAN has 1,628)
_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn)  # what layers allocate weights with

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``factory`` available to :func:`create_model` under its function name.

    Its return annotation names the architecture, whose constructor's signature says which kwargs it takes."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    architecture = typing.get_type_hints(factory).get("return")
    if not (isinstance(architecture, type) and issubclass(architecture, nn.Module)):
        raise TypeError(f"model {factory.__name__!r} must be annotated with the nn.Module class it returns")
    _MODELS[factory.__name__] = factory
    _ARCHITECTURES[factory.__name__] = architecture
    return factory


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("edsr_small", spatial_dims=2, scale=(2, 2))``.

    Raises:
        TypeError: a kwarg the architecture does not take.
        ValueError: an unknown model, a kwarg of the wrong type, an int kwarg outside 1..MAX_INT, a float that is
            not finite, or a network that would hold more than MAX_VALUES values or MAX_TENSORS tensors (refused
            before allocating them).
    """
    check_kwargs(name, kwargs)
    with _SizeLimit(f"model {name!r} with {short(repr(kwargs))}"):
        return _MODELS[name](**kwargs)


def check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse what :func:`create_model` refuses before building: an unknown model, unknown or ill-typed kwargs."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {short(repr(name))}; known: {', '.join(list_models())}")
    check_signature(_ARCHITECTURES[name], kwargs, name)


def check_signature(architecture: type[nn.Module], kwargs: dict[str, Any], where: str) -> None:
    """Refuse kwargs ``architecture``'s constructor does not take (TypeError), of the wrong type, ints outside
    1..MAX_INT and floats that are not finite (ValueError), naming the kwarg after ``where``."""
    init = architecture.__init__
    accepted = [p for p in inspect.signature(init).parameters if p != "self"]
    unknown = sorted(map(str, set(kwargs) - set(accepted)))
    if unknown:
        raise TypeError(f"{where} takes no kwarg {short(', '.join(unknown))}; it takes {', '.join(accepted)}")
    hints = typing.get_type_hints(init)
    for key, value in kwargs.items():
        _check_value(value, hints.get(key, Any), f"{where} kwarg {key}")


def _check_value(value: Any, hint: Any, where: str) -> None:
    """``value`` against a constructor annotation: int, float, str, bool or Sequence[...] of them."""
    origin = typing.get_origin(hint)
    if origin is Sequence or origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {short(repr(value))}")
        for item in value:
            _check_value(item, typing.get_args(hint)[0], where)
    elif hint is int or hint is float:
        if isinstance(value, bool) or not isinstance(value, int if hint is int else int | float):
            kind = "an integer" if hint is int else "a number"
            raise ValueError(f"{where}: expected {kind}, got {short(repr(value))}")
        if hint is int and not 1 <= value <= MAX_INT:
            raise ValueError(f"{where}: expected an integer from 1 to {MAX_INT}, got {short(repr(value))}")
        if hint is float and not _finite(value):
            raise ValueError(f"{where}: expected a finite number, got {short(repr(value))}")
    elif hint in (str, bool) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected a {hint.__name__}, got {short(repr(value))}")


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float, or an int that fits in one."""
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


class _SizeLimit(TorchFunctionMode):
    """Count what a build allocates and stop it, before the allocation, past MAX_VALUES values or MAX_TENSORS."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what, self.values, self.tensors = what, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            shape = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], Sequence) else args)
            self.values += math.prod(shape)
            self.tensors += 1
            if self.values > MAX_VALUES or self.tensors > MAX_TENSORS:
                raise ValueError(
                    f"{self.what}: too large (over {MAX_VALUES:,} values or {MAX_TENSORS:,} tensors); refused"
                )
        return func(*args, **kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
