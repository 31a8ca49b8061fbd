"""Segment-masked EM cutouts around skeleton nodes, at the model's (coarser) scale.

Why: SegCLR's input is a cube of EM centred on a skeleton node with everything outside the node's own segment
set to 0 ("segmentation-guided"), optionally with the mask as a second channel. The published model reads
129^3 voxels at ~32 nm; the CPU model here reads e.g. 33^3 at 2-4x the scale-0 voxel size. Downsampling is
done once per read region (EM mean-pooled, segmentation sampled at the pooling window's centre voxel), then
cutouts are plain slices, so training and blockwise inference use the same code.

Coordinates: arrays are ZYX; node positions come in nm XYZ (the store's convention: ``(voxel + offset) * size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from storage.box import Box

Triple = tuple[int, int, int]


def downsample_em(em: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean-pool uint8 EM by integer factors (ZYX); the shape must be divisible (callers read aligned boxes)."""
    f = tuple(int(x) for x in factors)
    if f == (1, 1, 1):
        return np.asarray(em, np.uint8)
    z, y, x = (s // k for s, k in zip(em.shape, f))
    a = np.asarray(em[: z * f[0], : y * f[1], : x * f[2]], np.float32)
    a = a.reshape(z, f[0], y, f[1], x, f[2]).mean(axis=(1, 3, 5))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def downsample_seg(seg: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Sample ids at each pooling window's centre voxel (ids cannot be averaged)."""
    f = tuple(int(x) for x in factors)
    if f == (1, 1, 1):
        return np.asarray(seg)
    z, y, x = (s // k for s, k in zip(seg.shape, f))
    return np.ascontiguousarray(seg[f[0] // 2: z * f[0]: f[0], f[1] // 2: y * f[1]: f[1], f[2] // 2: x * f[2]: f[2]])


def extract_cutout(
    em: np.ndarray,
    seg: np.ndarray,
    center_zyx: Sequence[int],
    size_zyx: Sequence[int],
    segment_id: int,
    channels: Sequence[str] = ("masked_em", "mask"),
) -> np.ndarray:
    """(Z, Y, X, C) float32 cutout centred on ``center_zyx`` (array coordinates); outside the array is 0.

    ``masked_em`` = EM/255 where ``seg == segment_id`` else 0; ``mask`` = 1 there; ``em`` = EM/255 unmasked.
    The centre voxel is at index ``size // 2`` on every axis.
    """
    size = tuple(int(s) for s in size_zyx)
    start = tuple(int(c) - s // 2 for c, s in zip(center_zyx, size))
    want = Box.from_shape(size, start)
    have = want.intersect(Box.from_shape(em.shape))
    em_c = np.zeros(size, np.float32)
    mask = np.zeros(size, bool)
    if not have.empty:
        dst = have.relative_to(want).slices
        em_c[dst] = em[have.slices]
        mask[dst] = seg[have.slices] == np.uint64(segment_id)
    em_c *= np.float32(1.0 / 255.0)
    out = []
    for c in channels:
        if c == "masked_em":
            out.append(np.where(mask, em_c, np.float32(0)))
        elif c == "mask":
            out.append(mask.astype(np.float32))
        elif c == "em":
            out.append(em_c)
        else:
            raise ValueError(f"unknown cutout channel {c!r}")
    return np.stack(out, axis=-1)


@dataclass
class ScaledRegion:
    """EM + segmentation of one region at the model scale, with the mapping from nm positions into it.

    ``origin`` is the scale-0 voxel (ZYX, volume coordinates incl. voxel offset) of the region's first voxel;
    ``voxel_size_nm`` is XYZ at scale 0; ``downsample`` ZYX.
    """

    em: np.ndarray
    seg: np.ndarray
    origin: Triple
    voxel_size_nm: tuple[float, float, float]
    downsample: Triple

    def nm_to_index(self, xyz_nm: np.ndarray) -> np.ndarray:
        """(N, 3) nm XYZ -> (N, 3) int ZYX indices into ``em``/``seg`` (may fall outside the region)."""
        xyz_nm = np.atleast_2d(np.asarray(xyz_nm, np.float64))
        vox_zyx = np.rint(xyz_nm / np.asarray(self.voxel_size_nm, np.float64))[:, ::-1].astype(np.int64)
        return (vox_zyx - np.asarray(self.origin)) // np.asarray(self.downsample)

    def cutouts(self, xyz_nm: np.ndarray, segment_ids: np.ndarray, size_zyx: Sequence[int],
                channels: Sequence[str], jitter: np.ndarray | None = None) -> np.ndarray:
        """(N, Z, Y, X, C) cutouts for N nodes; ``jitter`` (N, 3) ZYX model-scale voxels shifts the centres."""
        idx = self.nm_to_index(xyz_nm)
        if jitter is not None:
            idx = idx + np.asarray(jitter, np.int64)
        out = np.empty((len(idx), *tuple(size_zyx), len(channels)), np.float32)
        for i, (c, sid) in enumerate(zip(idx, np.asarray(segment_ids, np.uint64))):
            out[i] = extract_cutout(self.em, self.seg, c, size_zyx, int(sid), channels)
        return out


def scale_region(em: np.ndarray, seg: np.ndarray, origin_zyx: Sequence[int], voxel_size_nm: Sequence[float],
                 downsample: Sequence[int]) -> ScaledRegion:
    """Downsample a scale-0 region (origin should be a multiple of ``downsample`` for a stable grid)."""
    return ScaledRegion(downsample_em(em, downsample), downsample_seg(seg, downsample),
                        tuple(int(o) for o in origin_zyx), tuple(float(v) for v in voxel_size_nm),
                        tuple(int(d) for d in downsample))


def aligned_read_box(box: Box, downsample: Sequence[int], bounds: Box) -> Box:
    """Grow ``box`` outward to multiples of ``downsample`` (from the volume origin), then clip to whole windows
    inside ``bounds``; reading this box keeps the model-scale grid identical across blocks."""
    f = tuple(int(d) for d in downsample)
    start = tuple(max(b0, (s - b0) // k * k + b0) for s, k, b0 in zip(box.start, f, bounds.start))
    stop = tuple(min(b0 + (b1 - b0) // k * k, -(-(e - b0) // k) * k + b0)
                 for e, k, b0, b1 in zip(box.stop, f, bounds.start, bounds.stop))
    return Box(start, stop)
