"""Multiscale pyramids: images downsampled by mean, labels by mode, one output block at a time.

`downsample_block(src_spec, dst_spec, box)` is a pure block function: it opens both volumes from their specs,
reads the source voxels under the destination `box`, downsamples and writes exactly `box`. The blockwise runner
can call it per block (via `downsample_block_fn`); `build_pyramid` is the simple serial driver used by tests and
small volumes. New scales are recorded in the format's metadata by `storage.volume.create_scale` (precomputed
info scales, NGFF multiscales datasets, n5 sN), always on the driver before blocks run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from storage.box import Block, BlockGrid, Box
from storage.errors import VolumeError
from storage.volume import Volume, create_scale, open_volume


def downsample_mean(array: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """Mean over factor boxes (edge voxels replicated where the shape is not a multiple). Ints are rounded."""
    blocks = _blocks(array, factor_zyx)
    out = blocks.mean(axis=-1, dtype=np.float64)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


def downsample_mode(array: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """Most frequent label per factor box; ties go to a non-zero label, then the smallest id.

    Preferring non-zero keeps thin processes from vanishing into background at coarse scales.
    """
    blocks = np.sort(_blocks(array, factor_zyx), axis=-1)
    k = blocks.shape[-1]
    counts = np.zeros(blocks.shape, dtype=np.int32)
    for j in range(k):
        counts += blocks == blocks[..., j : j + 1]
    score = counts * 2 + (blocks != 0)
    pick = np.argmax(score, axis=-1)
    return np.take_along_axis(blocks, pick[..., None], axis=-1)[..., 0]


def _blocks(array: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """(Z', Y', X', fz*fy*fx) view of `array`, padded by edge replication to a multiple of the factor."""
    f = tuple(int(v) for v in factor_zyx)
    pad = [(0, (-s) % fi) for s, fi in zip(array.shape, f)]
    if any(p for _, p in pad):
        array = np.pad(array, pad, mode="edge")
    z, y, x = (s // fi for s, fi in zip(array.shape, f))
    b = array.reshape(z, f[0], y, f[1], x, f[2]).transpose(0, 2, 4, 1, 3, 5)
    return b.reshape(z, y, x, f[0] * f[1] * f[2])


def downsample(array: np.ndarray, factor_zyx: Sequence[int], kind: str) -> np.ndarray:
    return downsample_mode(array, factor_zyx) if kind == "segmentation" else downsample_mean(array, factor_zyx)


def scale_factor(src: Volume, dst: Volume) -> tuple[int, int, int]:
    """Integer ZYX factor between two scales, from their voxel sizes."""
    ratio = [d / s for d, s in zip(reversed(dst.voxel_size), reversed(src.voxel_size))]
    factor = tuple(int(round(r)) for r in ratio)
    if any(abs(r - f) > 1e-6 or f < 1 for r, f in zip(ratio, factor)):
        raise VolumeError(f"{dst.name} voxel size {dst.voxel_size} is not an integer multiple of "
                          f"{src.name} voxel size {src.voxel_size}")
    return factor  # type: ignore[return-value]


def downsample_block(src_spec: dict | str, dst_spec: dict | str, box: Box) -> dict:
    """Fill `box` of the destination scale from the source scale. Pure and idempotent; returns small stats."""
    src = open_volume(src_spec)
    dst = open_volume(dst_spec, mode="r+", fill_missing=True)
    f = scale_factor(src, dst)
    box = box.intersect(dst.bounds)
    if box.empty:
        return {"voxels": 0}
    src_box = Box(tuple(a * fi for a, fi in zip(box.start, f)), tuple(b * fi for b, fi in zip(box.stop, f)))
    clipped = src_box.intersect(src.bounds)
    if clipped.empty:
        raise VolumeError(f"block {box} of {dst.name} has no source voxels in {src.name}")
    data = src.read(clipped)
    # Pad to the full source box by edge replication (volume edges / offsets not divisible by the factor).
    before = [c - s for c, s in zip(clipped.start, src_box.start)]
    after = [s - c for c, s in zip(clipped.stop, src_box.stop)]
    if any(before) or any(after):
        data = np.pad(data, list(zip(before, after)), mode="edge")
    out = downsample(data, f, dst.kind)
    dst.write(box, out.astype(dst.dtype, copy=False))
    return {"voxels": int(box.size)}


def downsample_block_fn(block: Block, *, src_spec: dict, dst_spec: dict) -> dict:
    """Adapter with the runner's block-function signature: `block_fn(block, **params)`."""
    return downsample_block(src_spec, dst_spec, block.write)


def add_scales(volume: Volume | str | dict, factors_xyz: Sequence[Sequence[int]], *,
               chunk_shape_zyx: Sequence[int] | None = None) -> list[Volume]:
    """Create the pyramid levels' metadata (driver side): level i+1 = level i downsampled by factors_xyz[i]."""
    vol = volume if isinstance(volume, Volume) else open_volume(volume)
    out = []
    for factor in factors_xyz:
        vol = create_scale(vol, factor, chunk_shape_zyx=chunk_shape_zyx)
        out.append(vol)
    return out


def build_pyramid(volume: Volume | str | dict, factors_xyz: Sequence[Sequence[int]] = ((2, 2, 2),), *,
                  chunk_shape_zyx: Sequence[int] | None = None) -> list[Volume]:
    """Serial driver: add the scales and fill them block by block (one write-aligned block at a time)."""
    src = volume if isinstance(volume, Volume) else open_volume(volume)
    levels = add_scales(src, factors_xyz, chunk_shape_zyx=chunk_shape_zyx)
    for dst in levels:
        grid = BlockGrid(dst.bounds, dst.chunk_shape, alignment=dst.chunk_shape)
        src_spec, dst_spec = src.spec, dst.spec
        for block in grid:
            downsample_block(src_spec, dst_spec, block.write)
        src = open_volume(dst.spec)
    return levels
