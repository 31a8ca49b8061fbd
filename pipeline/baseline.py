"""Classical baseline: smoothed-intensity watershed, best of a few parameters chosen on training data.

Membranes are dark, cell interiors bright: the elevation is the Gaussian-smoothed inverted image, markers are its
h-minima (`markers="intensity"`) or the h-maxima of the distance to thresholded membranes (`markers="distance"`),
and `skimage.segmentation.watershed` floods from them. This is the yardstick the synthetic data must beat (VOI > 0.5
for the best setting; see tests/test_baseline.py) and that trained models must beat (benchmarks/ffn_quality.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import scipy.ndimage as ndi

from pipeline.metrics import Scores, evaluate


@dataclass(frozen=True)
class WatershedParams:
    sigma_nm: float = 16.0          # Gaussian smoothing, same physical width on every axis (clipped to >= 0.3 voxel)
    h: float = 8.0                  # depth of minima kept as markers (intensity units), or of distance maxima (nm)
    markers: str = "intensity"      # "intensity" or "distance"
    threshold: float = 110.0        # membrane threshold for markers="distance" (smoothed intensity below = membrane)

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_GRID: tuple[WatershedParams, ...] = tuple(
    [WatershedParams(sigma_nm=s, h=h) for s in (12.0, 24.0) for h in (4.0, 10.0, 20.0)]
    + [WatershedParams(sigma_nm=12.0, h=h, markers="distance", threshold=t) for h in (20.0, 60.0) for t in (100.0, 125.0)]
)


def _sigma_voxels(sigma_nm: float, voxel_size_xyz_nm: Sequence[float]) -> tuple[float, float, float]:
    x, y, z = voxel_size_xyz_nm
    return tuple(max(0.3, sigma_nm / v) for v in (z, y, x))  # type: ignore[return-value]


def watershed_baseline(raw: np.ndarray, voxel_size_xyz_nm: Sequence[float], params: WatershedParams = WatershedParams()
                       ) -> np.ndarray:
    """uint64 segmentation of a ZYX uint8/float image (ids from 1)."""
    from skimage.morphology import h_maxima, h_minima
    from skimage.segmentation import watershed

    img = ndi.gaussian_filter(raw.astype(np.float32), _sigma_voxels(params.sigma_nm, voxel_size_xyz_nm))
    elevation = img.max() - img
    if params.markers == "intensity":
        peaks = h_minima(elevation, params.h)
    elif params.markers == "distance":
        x, y, z = voxel_size_xyz_nm
        dist = ndi.distance_transform_edt(img >= params.threshold, sampling=(z, y, x)).astype(np.float32)
        peaks = h_maxima(dist, params.h) & (dist > 0)
    else:
        raise ValueError(f"unknown marker kind {params.markers!r} (intensity or distance)")
    markers, _ = ndi.label(peaks)
    return watershed(elevation, markers).astype(np.uint64)


def best_baseline(raw: np.ndarray, gt: np.ndarray, voxel_size_xyz_nm: Sequence[float],
                  grid: Iterable[WatershedParams] = DEFAULT_GRID) -> tuple[WatershedParams, Scores, list]:
    """Try every setting on training data; return the one with the lowest VOI, its scores and all results."""
    results = []
    for p in grid:
        seg = watershed_baseline(raw, voxel_size_xyz_nm, p)
        results.append((p, evaluate(seg, gt)))
    best = min(results, key=lambda r: r[1].voi)
    return best[0], best[1], results
