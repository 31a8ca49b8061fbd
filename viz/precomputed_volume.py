"""Image and segmentation pyramids in Neuroglancer precomputed format, written through storage.volume.

This is the viz-side front door to `storage.volume.create_volume` + `storage.pyramid.build_pyramid` (the one
pyramid implementation: mean for images, mode for labels, block by block): it takes a numpy ZYX array or
anything with ``.shape`` and ``.read(box)`` (a ``storage.volume.Volume``), picks the scales, the chunking and,
when asked, a shard shape, and copies scale 0 one write-aligned block at a time (the shard when sharded, so
every shard has exactly one writer) so a volume larger than memory streams through.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from storage.box import BlockGrid, Box
from storage.errors import ConnectomeError
from storage.pyramid import build_pyramid
from storage.volume import IMAGE_ENCODINGS, create_volume
from viz.kvstore import kvstore_url, read_json, write_json

SEGMENTATION_ENCODINGS = ("compressed_segmentation",)


@dataclass(frozen=True)
class PyramidSpec:
    """What to write. XYZ tuples because they end up in the ``info`` file as Neuroglancer reads it."""

    kind: str  # "image" | "segmentation"
    voxel_size_xyz_nm: tuple[float, float, float]
    voxel_offset_xyz: tuple[int, int, int] = (0, 0, 0)
    chunk_size_xyz: tuple[int, int, int] = (64, 64, 64)
    encoding: str | None = None  # image: raw (default) or jpeg (uint8); segmentation: compressed_segmentation
    jpeg_quality: int | None = None  # with jpeg: 1-100 (None: TensorStore's 75)
    sharded: bool = False
    num_scales: int | None = None  # None: downsample until the volume fits in one chunk
    max_shard_chunks: int = 8  # chunks per shard along each axis (a power of two)
    block_voxels: int = 256**3  # upper bound on voxels copied per step (memory bound)

    def __post_init__(self) -> None:
        if self.kind not in ("image", "segmentation"):
            raise ConnectomeError(f"pyramid kind must be 'image' or 'segmentation', got {self.kind!r}")
        allowed = IMAGE_ENCODINGS if self.kind == "image" else SEGMENTATION_ENCODINGS
        if self.resolved_encoding not in allowed:
            raise ConnectomeError(f"encoding {self.encoding!r} is not valid for a {self.kind} (use one of {allowed})")
        if any(v <= 0 for v in self.voxel_size_xyz_nm):
            raise ConnectomeError(f"voxel size must be positive, got {self.voxel_size_xyz_nm} nm (xyz)")

    @property
    def resolved_encoding(self) -> str:
        if self.encoding:
            return self.encoding
        return "raw" if self.kind == "image" else "compressed_segmentation"


def plan_scales(
    shape_xyz: Sequence[int], voxel_size_xyz: Sequence[float], chunk_xyz: Sequence[int], num_scales: int | None
) -> list[tuple[int, int, int]]:
    """Per-scale downsampling factors relative to the previous scale (the first is (1,1,1)).

    A dimension is halved only while it is not already coarser than the finest dimension (anisotropic EM
    first becomes isotropic), and the pyramid stops when the volume fits in one chunk or at `num_scales`.
    """
    factors = [(1, 1, 1)]
    shape = [int(s) for s in shape_xyz]
    res = [float(r) for r in voxel_size_xyz]
    while num_scales is None or len(factors) < num_scales:
        if num_scales is None and all(s <= c for s, c in zip(shape, chunk_xyz)):
            break
        finest = min(res)
        f = tuple(2 if (r < 2 * finest and s > 1) else 1 for r, s in zip(res, shape))
        if f == (1, 1, 1):
            break
        factors.append(f)  # type: ignore[arg-type]
        shape = [math.ceil(s / k) for s, k in zip(shape, f)]
        res = [r * k for r, k in zip(res, f)]
    return factors


def shard_shape(shape_zyx: Sequence[int], chunk_zyx: Sequence[int], max_chunks: int) -> tuple[int, int, int]:
    """Chunk shape times a power of two per axis (what Morton-keyed precomputed shards can be), at most the
    volume rounded up to a power of two and `max_chunks` chunks per axis."""
    out = []
    for s, c in zip(shape_zyx, chunk_zyx):
        n = 1
        while n < max_chunks and n * c < s:
            n *= 2
        out.append(n * c)
    return tuple(out)  # type: ignore[return-value]


def _source_reader(data: Any):
    """(shape_zyx, dtype, read(box relative to the data) -> ndarray) for a numpy array or a Volume-like object."""
    if isinstance(data, np.ndarray):
        if data.ndim != 3:
            raise ConnectomeError(f"expected a 3-d ZYX array, got shape {data.shape}")
        return data.shape, data.dtype, lambda box: np.asarray(data[box.slices])
    if hasattr(data, "read") and hasattr(data, "shape"):
        bounds = getattr(data, "bounds", Box.from_shape(data.shape))
        return tuple(data.shape), np.dtype(data.dtype), lambda box: np.asarray(data.read(box.translate(bounds.start)))
    raise ConnectomeError(f"cannot publish {type(data).__name__}: expected a numpy ZYX array or a Volume")


def write_pyramid(dest: str | os.PathLike, data: Any, spec: PyramidSpec, *, delete_existing: bool = True) -> dict:
    """Write `data` (ZYX) and its downsampled scales to `dest` (path or URL); returns the written info."""
    shape_zyx, dtype, read = _source_reader(data)
    dtype = np.dtype(dtype)
    if spec.kind == "segmentation":
        if dtype.kind not in "ui":
            raise ConnectomeError(f"segmentation must have an integer dtype, got {dtype}")
        # compressed_segmentation stores uint32 or uint64
        dtype = np.dtype(np.uint64) if dtype.itemsize > 4 or dtype.kind == "i" else np.dtype(np.uint32)
    shape_xyz = tuple(reversed([int(s) for s in shape_zyx]))
    chunk_zyx = tuple(min(c, s) for c, s in zip(reversed(spec.chunk_size_xyz), shape_zyx))
    shard_zyx = shard_shape(shape_zyx, chunk_zyx, spec.max_shard_chunks) if spec.sharded else None
    vol = create_volume(
        "precomputed://" + kvstore_url(dest), shape_zyx=shape_zyx, dtype=dtype,
        voxel_size_xyz_nm=spec.voxel_size_xyz_nm, chunk_shape_zyx=chunk_zyx, shard_shape_zyx=shard_zyx,
        kind=spec.kind, voxel_offset_xyz=spec.voxel_offset_xyz, delete_existing=delete_existing,
        encoding=spec.resolved_encoding, jpeg_quality=spec.jpeg_quality,
    )
    align = vol.chunk_shape
    k = max(1, int(round((spec.block_voxels / int(np.prod(align))) ** (1 / 3))))
    grid = BlockGrid(vol.bounds, tuple(a * k for a in align), alignment=align)
    for block in grid:
        vol.write(block.write, read(block.write.relative_to(vol.bounds)).astype(dtype, copy=False))
    factors = plan_scales(shape_xyz, spec.voxel_size_xyz_nm, spec.chunk_size_xyz, spec.num_scales)
    if len(factors) > 1:
        build_pyramid(vol, factors[1:])
    return read_json(dest)


def link_segmentation_extras(
    seg_dest: str | os.PathLike,
    *,
    mesh: str | None = None,
    skeletons: str | None = None,
    segment_properties: str | None = None,
) -> dict:
    """Reference mesh / skeleton / segment-property subdirectories from a segmentation's ``info``.

    Neuroglancer finds them only through these keys; a key pointing at a directory without its own ``info``
    (skeletons, segment properties) makes the whole layer fail, so writers create those first.
    """
    info = read_json(seg_dest)
    if info.get("type") != "segmentation":
        raise ConnectomeError(f"{kvstore_url(seg_dest)} is not a segmentation (type {info.get('type')!r})")
    for key, value in (("mesh", mesh), ("skeletons", skeletons), ("segment_properties", segment_properties)):
        if value is not None:
            info[key] = value
    write_json(seg_dest, "info", info)
    return info
