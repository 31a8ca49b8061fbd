"""Image and segmentation pyramids in Neuroglancer precomputed format, written through TensorStore.

Scale 0 is copied from the source block by block (each block aligned to the output's write chunk: the shard
when sharded, so every shard has exactly one writer); each coarser scale is TensorStore's ``downsample``
view of the previous one (``mean`` for images, ``mode`` for segmentations, so a label never becomes the
average of two neighbours) copied the same way. The source is a numpy ZYX array or anything with
``.shape`` and ``.read(box)`` (a ``storage.volume.Volume``), so a volume larger than memory streams through.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from storage.box import BlockGrid, Box
from storage.errors import ConnectomeError
from viz.kvstore import kvstore_url, read_json, write_json

IMAGE_ENCODINGS = ("raw", "jpeg", "png")
SEGMENTATION_ENCODINGS = ("compressed_segmentation", "raw")


@dataclass(frozen=True)
class PyramidSpec:
    """What to write. XYZ tuples because they end up in the ``info`` file as Neuroglancer reads it."""

    kind: str  # "image" | "segmentation"
    voxel_size_xyz_nm: tuple[float, float, float]
    voxel_offset_xyz: tuple[int, int, int] = (0, 0, 0)
    chunk_size_xyz: tuple[int, int, int] = (64, 64, 64)
    encoding: str | None = None  # image: raw (default) | jpeg | png; segmentation: compressed_segmentation
    sharded: bool = False
    num_scales: int | None = None  # None: downsample until the volume fits in one chunk
    jpeg_quality: int = 90
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


def _scale_key(resolution: Sequence[float]) -> str:
    return "_".join(str(int(r)) if float(r).is_integer() else str(r) for r in resolution)


def _sharding(size_xyz: Sequence[int], chunk_xyz: Sequence[int], encoding: str, dtype: np.dtype) -> dict:
    from cloudvolume.datasource.precomputed.sharding import compute_shard_params_for_image

    spec = compute_shard_params_for_image(
        tuple(int(s) for s in size_xyz), tuple(int(c) for c in chunk_xyz), encoding, np.dtype(dtype).name,
        data_encoding="raw" if encoding in ("jpeg", "png") else "gzip",
    ).to_dict()
    return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in spec.items()}


def _scale_metadata(spec: PyramidSpec, size_xyz, offset_xyz, resolution, dtype) -> dict:
    meta: dict[str, Any] = {
        "key": _scale_key(resolution),
        "size": [int(s) for s in size_xyz],
        "voxel_offset": [int(o) for o in offset_xyz],
        "resolution": [float(r) for r in resolution],
        "encoding": spec.resolved_encoding,
        "chunk_size": [int(min(c, max(1, s))) for c, s in zip(spec.chunk_size_xyz, size_xyz)],
    }
    if spec.resolved_encoding == "compressed_segmentation":
        meta["compressed_segmentation_block_size"] = [8, 8, 8]
    if spec.resolved_encoding == "jpeg":
        meta["jpeg_quality"] = int(spec.jpeg_quality)
    if spec.sharded:
        meta["sharding"] = _sharding(size_xyz, meta["chunk_size"], spec.resolved_encoding, dtype)
    return meta


def _source_reader(data: Any):
    """(shape_zyx, dtype, read(box_relative_zyx) -> ndarray) for a numpy array or a Volume-like object."""
    if isinstance(data, np.ndarray):
        if data.ndim != 3:
            raise ConnectomeError(f"expected a 3-d ZYX array, got shape {data.shape}")
        return data.shape, data.dtype, lambda box: np.asarray(data[box.slices])
    if hasattr(data, "read") and hasattr(data, "shape"):
        bounds = getattr(data, "bounds", Box.from_shape(data.shape))
        return tuple(data.shape), np.dtype(data.dtype), lambda box: np.asarray(data.read(box.translate(bounds.start)))
    raise ConnectomeError(f"cannot publish {type(data).__name__}: expected a numpy ZYX array or a Volume")


def _copy_blockwise(dst: ts.TensorStore, read_zyx, bounds_zyx: Box, block_voxels: int) -> None:
    """Copy `read_zyx(box relative to bounds)` into dst (x,y,z,channel) in blocks aligned to its write chunk."""
    write_xyz = [int(c) for c in dst.chunk_layout.write_chunk.shape[:3]]
    align_zyx = tuple(reversed(write_xyz))
    per_block = int(np.prod(align_zyx))
    k = max(1, int(round((block_voxels / per_block) ** (1 / 3))))
    block_shape = tuple(a * k for a in align_zyx)
    grid = BlockGrid(bounds_zyx, block_shape, alignment=align_zyx)
    for block in grid:
        rel = block.write.relative_to(bounds_zyx)
        arr = read_zyx(rel)
        (z0, y0, x0), (z1, y1, x1) = block.write.start, block.write.stop
        dst[x0:x1, y0:y1, z0:z1, 0].write(np.ascontiguousarray(arr.transpose(2, 1, 0))).result()


def write_pyramid(dest: str | os.PathLike, data: Any, spec: PyramidSpec, *, delete_existing: bool = True) -> dict:
    """Write `data` (ZYX) and its downsampled scales to `dest` (path or URL); returns the written info.

    Grid alignment is relative to the voxel offset, so a volume with a non-zero offset keeps its place in
    world coordinates at every scale.
    """
    shape_zyx, dtype, read = _source_reader(data)
    dtype = np.dtype(dtype)
    if spec.kind == "segmentation" and dtype.kind not in "ui":
        raise ConnectomeError(f"segmentation must have an integer dtype, got {dtype}")
    if spec.resolved_encoding == "jpeg" and dtype != np.uint8:
        raise ConnectomeError(f"jpeg encoding needs uint8 data, got {dtype}")
    if spec.kind == "segmentation":
        dtype = np.dtype(np.uint64) if dtype.itemsize > 4 or dtype.kind == "i" else np.dtype(np.uint32)
    base = {"driver": "neuroglancer_precomputed", "kvstore": kvstore_url(dest)}
    shape_xyz = tuple(reversed([int(s) for s in shape_zyx]))
    offset_xyz = tuple(int(o) for o in spec.voxel_offset_xyz)
    resolution = [float(r) for r in spec.voxel_size_xyz_nm]
    factors = plan_scales(shape_xyz, resolution, spec.chunk_size_xyz, spec.num_scales)

    scale0 = _scale_metadata(spec, shape_xyz, offset_xyz, resolution, dtype)
    store = ts.open(
        {
            **base,
            "multiscale_metadata": {"type": spec.kind, "data_type": dtype.name, "num_channels": 1},
            "scale_metadata": scale0,
        },
        create=True,
        delete_existing=delete_existing,
    ).result()
    bounds = Box.from_shape(shape_zyx, tuple(reversed(offset_xyz)))
    cast = (lambda box: read(box).astype(dtype, copy=False))
    _copy_blockwise(store, cast, bounds, spec.block_voxels)

    method = "mean" if spec.kind == "image" else "mode"
    for level, f in enumerate(factors[1:], start=1):
        down = ts.open(
            {
                "driver": "downsample",
                "downsample_factors": [*f, 1],
                "downsample_method": method,
                "base": {**base, "scale_index": level - 1},
            }
        ).result()
        lo = [int(v) for v in down.domain.inclusive_min[:3]]
        size = [int(v) for v in down.domain.shape[:3]]
        resolution = [r * k for r, k in zip(resolution, f)]
        meta = _scale_metadata(spec, size, lo, resolution, dtype)
        target = ts.open({**base, "scale_metadata": meta}, create=True).result()
        level_bounds = Box.from_shape(tuple(reversed(size)), tuple(reversed(lo)))

        def read_down(box: Box, _down=down, _bounds=level_bounds) -> np.ndarray:
            (z0, y0, x0), (z1, y1, x1) = box.translate(_bounds.start).start, box.translate(_bounds.start).stop
            return _down[x0:x1, y0:y1, z0:z1, 0].read().result().transpose(2, 1, 0)

        _copy_blockwise(target, read_down, level_bounds, spec.block_voxels)
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
