"""The model registry: named variant functions (as in timm), registered by explicit import in ``__init__``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``factory`` available to :func:`create_model` under its function name."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    _MODELS[factory.__name__] = factory
    return factory


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("edsr_small", spatial_dims=2, scale=(2, 2))``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
