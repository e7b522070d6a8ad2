"""Shared fixtures: seeded RNG and a small MR-like phantom with a real (oblique, anisotropic) geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsr.volume import Modality, Volume


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def oblique_affine(spacing=(0.9, 1.1, 2.0), angle=0.3, origin=(-40.0, 12.5, 7.0)) -> np.ndarray:
    """Voxel -> RAS+ mm: a rotation about the k axis, anisotropic spacing, an arbitrary origin."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def phantom(rng) -> Volume:
    """A 24x20x16 head-like phantom in [0, 1]: an ellipsoid 'skull' shell, a brighter core, a little noise."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in (24, 20, 16)), indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    image = 0.8 * (radius < 0.9) - 0.3 * (radius < 0.7) + 0.4 * (radius < 0.4) + 0.02 * rng.standard_normal(i.shape)
    return Volume(torch.from_numpy(image.astype(np.float32))[None], oblique_affine(), Modality.MR)
