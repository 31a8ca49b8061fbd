"""Importers: get EM people already have (HDF5, image stacks, .npy) into a chunked volume.

Sources are read lazily in z-slabs, so a stack larger than memory imports slab by slab; every slab spans the
whole xy plane and a multiple of the output's write-chunk depth, so each output chunk/shard is written once.
All sources are ZYX (an HDF5/npy array's first axis is z; a stack's files are z sections, in natural order).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from storage.box import Box
from storage.errors import VolumeError
from storage.volume import Volume, create_volume

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass
class Source:
    """A ZYX array-like source: shape, dtype and a z-slab reader."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    read_slab: Callable[[int, int], np.ndarray]
    close: Callable[[], None] = lambda: None


def open_source(src: str) -> Source:
    """`file.h5:dataset`, `file.npy`, a directory or glob of PNG/TIFF sections, or one (multi-page) TIFF."""
    if any(ch in src for ch in "*?[") and not os.path.exists(src):
        return _stack_source(src, sorted(glob.glob(src), key=_natural_key))
    h5 = _split_h5(src)
    if h5 is not None:
        return _h5_source(*h5)
    if not os.path.exists(src):
        raise VolumeError(f"import source {src} does not exist")
    if os.path.isdir(src):
        files = [os.path.join(src, f) for f in os.listdir(src) if f.lower().endswith(IMAGE_SUFFIXES)]
        return _stack_source(src, sorted(files, key=_natural_key))
    lower = src.lower()
    if lower.endswith(".npy"):
        try:
            arr = np.load(src, mmap_mode="r")
        except ValueError as exc:
            raise VolumeError(f"cannot read {src} as .npy: {exc}") from None
        return _array_source(src, arr)
    if lower.endswith((".tif", ".tiff")):
        import tifffile

        arr = tifffile.imread(src)
        if arr.ndim == 2:
            arr = arr[None]
        return _array_source(src, arr)
    raise VolumeError(f"cannot import {src}: expected file.h5:dataset, .npy, .tif or a directory/glob of sections")


def is_array_file(src: str) -> bool:
    """`file.h5[:dataset]`, `.npy` or `.tif(f)`: one array in one file, read whole (no chunked volume behind it)."""
    return _split_h5(src) is not None or src.lower().endswith((".npy", ".tif", ".tiff"))


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def _split_h5(src: str) -> tuple[str, str | None] | None:
    path, sep, dataset = src.rpartition(":")
    if sep and path.lower().endswith(H5_SUFFIXES):
        return path, dataset or None
    if src.lower().endswith(H5_SUFFIXES):
        return src, None
    return None


def _array_source(name: str, arr: Any) -> Source:
    if arr.ndim != 3:
        raise VolumeError(f"{name} has {arr.ndim} dimensions {tuple(arr.shape)}; expected 3 (z, y, x)")
    return Source(name, tuple(int(s) for s in arr.shape), np.dtype(arr.dtype),
                  lambda z0, z1: np.ascontiguousarray(arr[z0:z1]))


def _h5_source(path: str, dataset: str | None) -> Source:
    import h5py

    if not os.path.isfile(path):
        raise VolumeError(f"import source {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VolumeError(f"cannot open {path} as HDF5: {exc}") from None
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if dataset is None:
        if len(names) != 1:
            f.close()
            raise VolumeError(f"{path} has datasets {names}; name one as {path}:DATASET")
        dataset = names[0]
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        f.close()
        raise VolumeError(f"{path} has no dataset {dataset!r}; it has {names}")
    ds = f[dataset]
    src = _array_source(f"{path}:{dataset}", ds)
    src.close = f.close
    return src


def _read_section(path: str) -> np.ndarray:
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    return iio.imread(path)


def _stack_source(name: str, files: Sequence[str]) -> Source:
    if not files:
        raise VolumeError(f"no PNG/TIFF sections found at {name}")
    first = _read_section(files[0])
    if first.ndim != 2:
        raise VolumeError(f"section {files[0]} has shape {first.shape}; expected a 2-D grayscale image")

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + first.shape, dtype=first.dtype)
        for i, z in enumerate(range(z0, z1)):
            sec = _read_section(files[z])
            if sec.shape != first.shape or sec.dtype != first.dtype:
                raise VolumeError(f"section {files[z]} is {sec.shape} {sec.dtype}, but {files[0]} is "
                                  f"{first.shape} {first.dtype}; all sections must match")
            out[i] = sec
        return out

    return Source(name, (len(files),) + tuple(int(s) for s in first.shape), np.dtype(first.dtype), read)


def import_volume(src: str, dst: str, *, voxel_size_xyz_nm: Sequence[float],
                  chunk_shape_zyx: Sequence[int] = (64, 64, 64), shard_shape_zyx: Sequence[int] | None = None,
                  kind: str | None = None, dtype: Any = None, voxel_offset_xyz: Sequence[int] = (0, 0, 0),
                  format: str | None = None, delete_existing: bool = False,
                  crop: Box | None = None) -> Volume:
    """Copy a source into a new volume at `dst`. kind defaults to segmentation for uint32/uint64 sources.

    `crop` (ZYX box in source coordinates) imports only part of the source (tests, previews).
    """
    source = open_source(src)
    try:
        full = Box.from_shape(source.shape)
        region = full if crop is None else crop
        if not full.contains(region) or region.empty:
            raise VolumeError(f"crop {region} is outside import source {source.name} ({full})")
        out_dtype = np.dtype(dtype) if dtype is not None else source.dtype
        if kind is None:
            kind = "segmentation" if out_dtype in (np.uint32, np.uint64) else "image"
        chunk = tuple(min(c, s) for c, s in zip(chunk_shape_zyx, region.shape)) if shard_shape_zyx is None \
            else tuple(chunk_shape_zyx)
        vol = create_volume(dst, shape_zyx=region.shape, dtype=out_dtype, voxel_size_xyz_nm=voxel_size_xyz_nm,
                            chunk_shape_zyx=chunk, shard_shape_zyx=shard_shape_zyx, kind=kind,
                            voxel_offset_xyz=voxel_offset_xyz, format=format, delete_existing=delete_existing)
        depth = vol.chunk_shape[0]
        origin = vol.bounds.start
        for z0 in range(0, region.shape[0], depth):
            z1 = min(region.shape[0], z0 + depth)
            slab = source.read_slab(region.start[0] + z0, region.start[0] + z1)
            slab = slab[:, region.start[1]:region.stop[1], region.start[2]:region.stop[2]]
            if slab.dtype != out_dtype:
                if np.issubdtype(out_dtype, np.integer) and slab.size and (
                        slab.min() < np.iinfo(out_dtype).min or slab.max() > np.iinfo(out_dtype).max):
                    raise VolumeError(f"{source.name} has values outside {out_dtype} in sections {z0}..{z1 - 1}")
                slab = slab.astype(out_dtype)
            box = Box.from_shape(slab.shape, (origin[0] + z0, origin[1], origin[2]))
            vol.write(box, np.ascontiguousarray(slab))
        return vol
    finally:
        source.close()
