"""Seed policies: where the canvas tries to start a new object, in a fixed, reproducible order.

A policy is a callable ``policy(canvas) -> Iterator[(z, y, x)]``. Static policies (peaks, grid) compute the whole
list up front; ``PolicyFillEmptySpace`` looks at the canvas's segmentation while it iterates, so it only proposes
voxels that are still empty (the reference's remedy for holes left by the first pass).
Order matters for the result (first come wins), so every policy is deterministic, and ``reverse`` gives the
same seeds backwards for forward/reverse consensus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
from scipy import ndimage

from storage.errors import ConfigError

Pos = tuple[int, int, int]


class CanvasView(Protocol):  # what a policy may look at
    raw_image: np.ndarray
    shape: tuple[int, int, int]
    margin: np.ndarray
    segmentation: np.ndarray
    mask: np.ndarray | None


def _inside(coords: np.ndarray, shape: Sequence[int], margin: np.ndarray) -> np.ndarray:
    """Rows of ``coords`` whose FOV fits in the volume (the reference filters these early because they're cheap)."""
    if len(coords) == 0:
        return coords.reshape(0, 3)
    ok = np.all(coords >= margin, axis=1) & np.all(coords < np.asarray(shape) - margin, axis=1)
    return coords[ok]


def peak_coords(image: np.ndarray, mask: np.ndarray | None = None, sampling: Sequence[float] | None = None,
                min_distance: int = 3) -> np.ndarray:
    """Peaks of the distance transform of non-edge voxels, sorted ascending (z, y, x) like the reference.

    Edges = 3-D Sobel gradient magnitude above its Gaussian-blurred self (sigma 49/6: adaptive threshold);
    masked voxels count as edges so a big masked area does not pull seeds to its border. A fixed-seed 1e-4
    noise breaks ties on plateaus so the result does not depend on anything run before.
    """
    from skimage.feature import peak_local_max

    img = np.asarray(image, dtype=np.float32)
    edges = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
    thresh = ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
    filt_edges = edges > thresh
    del edges, thresh
    if mask is not None:
        filt_edges[mask] = True
    dt = ndimage.distance_transform_edt(~filt_edges, sampling=sampling).astype(np.float32)
    noise = np.random.RandomState(42).random_sample(dt.shape).astype(np.float32) * 1e-4
    idxs = peak_local_max(dt + noise, min_distance=min_distance, threshold_abs=0, threshold_rel=0,
                          exclude_border=False)
    if len(idxs) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    idxs = np.asarray(idxs, dtype=np.int64)
    return idxs[np.lexsort((idxs[:, 2], idxs[:, 1], idxs[:, 0]))]


def grid_coords(shape: Sequence[int], step: int = 16, offsets: Sequence[int] = (0, 8, 4, 12, 2, 10, 14)) -> np.ndarray:
    """Uniform 3-D grids at several offsets (the reference's PolicyGrid3d): coarse coverage first, then finer."""
    out = []
    for off in offsets:
        zz, yy, xx = np.meshgrid(*[np.arange(off, s, step) for s in shape], indexing="ij")
        out.append(np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 3), np.int64)


@dataclass(frozen=True)
class PolicyPeaks:
    min_distance: int = 3
    reverse: bool = False

    def __call__(self, canvas: CanvasView) -> Iterator[Pos]:
        coords = _inside(peak_coords(canvas.raw_image, canvas.mask, min_distance=self.min_distance),
                         canvas.shape, canvas.margin)
        if self.reverse:
            coords = coords[::-1]
        return (tuple(int(v) for v in c) for c in coords)


@dataclass(frozen=True)
class PolicyGrid:
    step: int = 16
    offsets: tuple[int, ...] = (0, 8, 4, 12, 2, 10, 14)
    reverse: bool = False

    def __call__(self, canvas: CanvasView) -> Iterator[Pos]:
        coords = _inside(grid_coords(canvas.shape, self.step, self.offsets), canvas.shape, canvas.margin)
        if self.reverse:
            coords = coords[::-1]
        return (tuple(int(v) for v in c) for c in coords)


@dataclass(frozen=True)
class PolicyFillEmptySpace:
    """Every ``step``-th voxel that is still unsegmented when the iterator reaches it (z, y, x order)."""

    step: int = 4
    reverse: bool = False

    def __call__(self, canvas: CanvasView) -> Iterator[Pos]:
        coords = _inside(grid_coords(canvas.shape, self.step, (0,)), canvas.shape, canvas.margin)
        if self.reverse:
            coords = coords[::-1]
        for c in coords:
            pos = (int(c[0]), int(c[1]), int(c[2]))
            if canvas.segmentation[pos] == 0:
                yield pos


@dataclass(frozen=True)
class SequentialPolicies:
    policies: tuple

    def __call__(self, canvas: CanvasView) -> Iterator[Pos]:
        for p in self.policies:
            yield from p(canvas)


_NAMES = {"peaks": PolicyPeaks, "grid": PolicyGrid, "fill": PolicyFillEmptySpace}


def make_seed_policy(spec, *, reverse: bool = False):
    """``"peaks"``, ``"grid"``, ``"fill"``, ``"peaks+fill"`` or a callable -> a policy."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    names = [s.strip() for s in str(spec).split("+") if s.strip()]
    bad = [n for n in names if n not in _NAMES]
    if not names or bad:
        raise ConfigError(f"seed_policy {spec!r}: unknown name(s) {bad or [spec]}; use peaks, grid, fill or a+b")
    policies = tuple(_NAMES[n](reverse=reverse) for n in names)
    if reverse:
        policies = policies[::-1]
    return policies[0] if len(policies) == 1 else SequentialPolicies(policies)
