"""Partitions: every labelled voxel gets a class from how much of its neighbourhood belongs to its own object.

Why: FFN training examples are centred on voxels. Uniform sampling over-represents the insides of big objects
(easy) and under-represents thin processes and boundaries (hard). google/ffn's ``compute_partitions`` therefore
computes, per voxel, the fraction of a ``(2r+1)^3`` box around it that carries the same id (the "local object
mask" fraction), quantizes it with a list of thresholds, and training draws the same number of examples from
every class. This module reproduces that; ``coordinates.BalancedSampler`` does the drawing.

Classes: 0 = background (label 0 or an object smaller than ``min_size``), ``1 .. len(thresholds)+1`` = the
quantized fraction (``np.digitize(fraction, thresholds) + 1``), ``EXCLUDED`` (255) = within ``r`` of the volume
border (the box does not fit) or outside the optional mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

EXCLUDED = 255
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def clear_dust(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with every object smaller than ``min_size`` voxels set to 0 (a copy)."""
    ids, counts = np.unique(labels, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    out = labels.copy()
    if small.size:
        out[np.isin(labels, small)] = 0
    return out


def compute_partitions(
    labels: np.ndarray,
    lom_radius: Sequence[int],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_size: int = 10000,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 class per voxel of ``labels`` (ZYX), see the module docstring.

    ``lom_radius`` is ZYX; google/ffn uses ``fov_size // 2 + deltas``. The box fraction is computed per object
    inside the object's bounding box grown by the radius, so the cost is the sum of those boxes, not
    objects x volume.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (ZYX), got shape {labels.shape}")
    radius = tuple(int(r) for r in lom_radius)
    thresholds = np.asarray(sorted(thresholds), dtype=np.float64)
    labels = clear_dust(labels, min_size) if min_size > 1 else labels
    # dense ids 1..n so find_objects returns one box per object
    ids = np.unique(labels)
    ids = ids[ids != 0]
    dense = np.zeros(labels.shape, dtype=np.int32)
    if ids.size:
        dense = np.searchsorted(ids, labels).astype(np.int32) + 1
        dense[labels == 0] = 0
    out = np.zeros(labels.shape, dtype=np.uint8)
    diam = tuple(2 * r + 1 for r in radius)
    for index, sl in enumerate(ndimage.find_objects(dense), start=1):
        if sl is None:
            continue
        grown = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(sl, radius, labels.shape))
        crop = dense[grown] == index
        # mean over the box with zero padding = fraction of the full box; exact up to float32 rounding
        fraction = ndimage.uniform_filter(crop.astype(np.float32), size=diam, mode="constant", cval=0.0)
        classes = (np.digitize(fraction[crop], thresholds) + 1).astype(np.uint8)
        view = out[grown]
        view[crop] = classes
    # the box does not fit near the border: those centres are never drawn
    for axis, r in enumerate(radius):
        if r <= 0:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, r)
        hi[axis] = slice(labels.shape[axis] - r, None)
        out[tuple(lo)] = EXCLUDED
        out[tuple(hi)] = EXCLUDED
    if mask is not None:
        out[~np.asarray(mask, dtype=bool)] = EXCLUDED
    return out
