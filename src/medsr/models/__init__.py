"""SR models for (N, C, *spatial) tensors. Each architecture module registers its variants when imported here."""

from medsr.models import bicubic, edsr, espcn, fsrcnn, rcan, rrdb, srcnn, vdsr  # noqa: F401  (register variants)
from medsr.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
