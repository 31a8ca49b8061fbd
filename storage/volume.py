"""Volumes: every voxel in or out goes through here (TensorStore underneath).

`open_volume` / `create_volume` give a `Volume`: a ZYX, box-addressed view of one scale of a zarr (v2), zarr3,
n5 or neuroglancer_precomputed volume on file, memory, gs, s3 or http storage. The volume's voxel size (nm) and
voxel offset travel in the format's own metadata (precomputed `info`; OME-NGFF multiscales on zarr groups; n5
`resolution`/`pixelResolution`), so other tools (Neuroglancer, cloud-volume, zarr-python, napari) see them too.

Coordinates: a Volume is addressed in global voxel coordinates of its scale, ZYX. `vol.bounds.start` is the
voxel offset (reversed to ZYX), so boxes mean the same voxels in precomputed (whose TensorStore domain starts at
voxel_offset) and zarr (whose arrays start at 0). Precomputed's x,y,z,channel and n5's x,y,z orders are hidden.

A Volume is cheap to re-open from `vol.spec` (a JSON TensorStore spec) inside a Dask worker; TensorStore handles
are never pickled. All handles in a process share one bounded Context (cache + concurrency), so several worker
processes on a node don't each grow an unbounded cache.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from storage import ngff
from storage.box import Box
from storage.errors import VolumeError
from storage.urls import FORMATS, kvstore_join, kvstore_parent, kvstore_spec, kvstore_url, parse_url

KINDS = ("image", "segmentation")
_FORMAT_NAMES = {"zarr": "zarr", "zarr2": "zarr", "zarr3": "zarr3", "n5": "n5",
                 "precomputed": "neuroglancer_precomputed", "neuroglancer_precomputed": "neuroglancer_precomputed"}

# --------------------------------------------------------------------------------------------------------------
# TensorStore context: one per process, bounded.
# --------------------------------------------------------------------------------------------------------------
_CONTEXT: tuple[int, ts.Context] | None = None


def context_spec() -> dict:
    """Cache and concurrency limits for this process.

    TensorStore's defaults are an unbounded-by-default-off cache and concurrency = all cores; with several Dask
    worker processes per node that oversubscribes. CONNECTOME_TS_CACHE_MB and CONNECTOME_TS_THREADS override.
    """
    cache_mb = int(os.environ.get("CONNECTOME_TS_CACHE_MB", "256"))
    threads = int(os.environ.get("CONNECTOME_TS_THREADS", str(min(os.cpu_count() or 1, 8))))
    return {
        "cache_pool": {"total_bytes_limit": cache_mb << 20},
        "data_copy_concurrency": {"limit": max(1, threads)},
        "file_io_concurrency": {"limit": max(4, threads)},
    }


def ts_context() -> ts.Context:
    """The process-wide context (re-created after a fork; memory:// volumes live in it)."""
    global _CONTEXT
    if _CONTEXT is None or _CONTEXT[0] != os.getpid():
        _CONTEXT = (os.getpid(), ts.Context(context_spec()))
    return _CONTEXT[1]


# --------------------------------------------------------------------------------------------------------------
# Small kvstore helpers (metadata files).
# --------------------------------------------------------------------------------------------------------------
def _kv(kvstore: dict) -> ts.KvStore:
    return ts.KvStore.open(kvstore, context=ts_context()).result()


def read_json(kvstore: dict, key: str) -> dict | None:
    """A JSON metadata file under `kvstore`, or None when missing. Unreadable JSON is a VolumeError."""
    try:
        result = _kv(kvstore).read(key).result()
    except Exception as exc:  # network / permission errors
        raise VolumeError(f"cannot read {kvstore_url(kvstore)}/{key}: {_short(exc)}") from None
    if result.state != "value":
        return None
    try:
        return json.loads(bytes(result.value))
    except ValueError:
        raise VolumeError(f"{kvstore_url(kvstore)}/{key} is not valid JSON") from None


def write_json(kvstore: dict, key: str, obj: dict) -> None:
    _kv(kvstore).write(key, json.dumps(obj, indent=1).encode()).result()


def detect_format(kvstore: dict, auto_zarr: bool = False) -> str | None:
    """Which format lives at `kvstore`, from its metadata files; None when nothing is there."""
    if read_json(kvstore, "zarr.json") is not None:
        return "zarr3"
    if read_json(kvstore, ".zarray") is not None or read_json(kvstore, ".zgroup") is not None:
        return "zarr"
    if auto_zarr:
        return None
    if read_json(kvstore, "info") is not None:
        return "neuroglancer_precomputed"
    if read_json(kvstore, "attributes.json") is not None:
        return "n5"
    return None


def _short(exc: BaseException) -> str:
    """TensorStore's message, one line, without the JSON spec it appends (the volume is named by the caller)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"\s*\[tensorstore_spec=.*$", "", text)


# --------------------------------------------------------------------------------------------------------------
# Resolving a location to one array (one scale).
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Resolved:
    format: str
    root: dict  # kvstore of the multiscale root (group / precomputed dir / bare array)
    level: int
    levels: list[ngff.Level]  # path (zarr/n5) or str(scale index) (precomputed)
    array_kvstore: dict
    kind: str | None
    layout: str  # "group" | "array" | "precomputed"


def _levels_of(fmt: str, root: dict) -> tuple[list[ngff.Level], str, str | None] | None:
    """(levels, layout, kind) for the thing at root, or None if it is not there."""
    name = kvstore_url(root)
    if fmt == "neuroglancer_precomputed":
        info = read_json(root, "info")
        if info is None:
            return None
        scales = info.get("scales") or []
        if not scales:
            raise VolumeError(f"precomputed info at {name} has no scales")
        levels = [ngff.Level(str(i), tuple(float(v) for v in s["resolution"]),
                             tuple(int(v) for v in s.get("voxel_offset", (0, 0, 0)))) for i, s in enumerate(scales)]
        return levels, "precomputed", info.get("type")
    if fmt == "zarr3":
        meta = read_json(root, "zarr.json")
        if meta is None:
            return None
        attrs = meta.get("attributes", {}) or {}
        kind = (attrs.get("connectome") or {}).get("kind")
        if meta.get("node_type") == "group":
            levels = ngff.read_levels(attrs)
            if not levels:
                raise VolumeError(f"zarr group {name} has no OME-NGFF multiscales; open one of its arrays instead")
            return levels, "group", kind
        return [ngff.Level("", (1.0, 1.0, 1.0), (0, 0, 0))], "array", kind
    if fmt == "zarr":
        if read_json(root, ".zarray") is not None:
            return [ngff.Level("", (1.0, 1.0, 1.0), (0, 0, 0))], "array", None
        if read_json(root, ".zgroup") is None:
            return None
        attrs = read_json(root, ".zattrs") or {}
        levels = ngff.read_levels(attrs)
        if not levels:
            raise VolumeError(f"zarr group {name} has no OME-NGFF multiscales; open one of its arrays instead")
        return levels, "group", (attrs.get("connectome") or {}).get("kind")
    if fmt == "n5":
        attrs = read_json(root, "attributes.json")
        if attrs is None:
            return None
        if "dimensions" in attrs:
            return [_n5_level("", attrs)], "array", attrs.get("connectome_kind")
        levels = []
        while True:
            sub = read_json(kvstore_join(root, f"s{len(levels)}"), "attributes.json")
            if sub is None or "dimensions" not in sub:
                break
            levels.append(_n5_level(f"s{len(levels)}", sub))
        if not levels:
            raise VolumeError(f"n5 group {name} has no scale arrays s0, s1, ...")
        return levels, "group", attrs.get("connectome_kind")
    raise VolumeError(f"unknown volume format {fmt!r}; use one of {', '.join(FORMATS)}")


def _n5_level(path: str, attrs: dict) -> ngff.Level:
    res = attrs.get("resolution") or (attrs.get("pixelResolution") or {}).get("dimensions") or (1, 1, 1)
    offset = attrs.get("voxel_offset") or (0, 0, 0)
    return ngff.Level(path, tuple(float(v) for v in res), tuple(int(v) for v in offset))  # type: ignore[arg-type]


def _resolve(fmt: str | None, kvstore: dict, level: int, auto_zarr: bool, name: str) -> _Resolved:
    if fmt is None or auto_zarr:
        detected = detect_format(kvstore, auto_zarr=auto_zarr)
        if detected is None:
            from storage.importers import is_array_file  # importers builds on this module

            what = "zarr volume" if auto_zarr else "volume"
            if is_array_file(name):
                raise VolumeError(f"no {what} at {name}: an array file, not a chunked volume (`connectome import "
                                  f"{name} DST --voxel-size X Y Z` converts it)")
            raise VolumeError(f"no {what} at {name} (missing path or no zarr.json/.zarray/info/attributes.json)")
        fmt = detected
    found = _levels_of(fmt, kvstore)
    if found is None:
        raise VolumeError(f"no {fmt} volume at {name} (missing path or metadata)")
    levels, layout, kind = found
    root = kvstore
    if layout == "array" and fmt != "neuroglancer_precomputed":
        # A bare array may be one level of an NGFF / n5 multiscale group: take voxel size etc. from there.
        parent = kvstore_parent(kvstore)
        if parent is not None:
            parent_kv, child = parent
            up = _levels_of(fmt, parent_kv) if _has_group_meta(fmt, parent_kv) else None
            if up is not None and up[1] == "group":
                paths = [lv.path for lv in up[0]]
                if child in paths:
                    if level:
                        raise VolumeError(f"{name} is one scale array; open its group {kvstore_url(parent_kv)} "
                                          f"to choose scale {level}")
                    return _Resolved(fmt, parent_kv, paths.index(child), up[0], kvstore, kind or up[2], "group")
    if not 0 <= level < len(levels):
        raise VolumeError(f"{name} has {len(levels)} scale(s); scale {level} does not exist")
    if layout == "precomputed":
        array_kv = kvstore
    else:
        array_kv = kvstore_join(kvstore, levels[level].path) if levels[level].path else kvstore
    return _Resolved(fmt, root, level, levels, array_kv, kind, layout)


def _has_group_meta(fmt: str, kvstore: dict) -> bool:
    key = {"zarr3": "zarr.json", "zarr": ".zgroup", "n5": "attributes.json"}.get(fmt)
    return key is not None and read_json(kvstore, key) is not None


# --------------------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Volume:
    """One scale of a volume, ZYX, addressed by Box in global voxel coordinates (bounds.start = voxel offset)."""

    name: str
    format: str
    kind: str
    spec: dict
    voxel_size: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    scale: int
    num_scales: int
    mode: str
    fill_missing: bool
    _store: Any = field(repr=False)
    _root: dict = field(repr=False)

    # --- geometry ---------------------------------------------------------------------------------------------
    @property
    def tensorstore(self) -> ts.TensorStore:
        """The ZYX TensorStore view (domain = bounds), e.g. for neuroglancer.LocalVolume or dask."""
        return self._store

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self._store.domain.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._store.dtype.numpy_dtype)

    @property
    def bounds(self) -> Box:
        return Box(tuple(int(v) for v in self._store.domain.inclusive_min),
                   tuple(int(v) for v in self._store.domain.exclusive_max))

    @property
    def chunk_shape(self) -> tuple[int, int, int]:
        """Write alignment (ZYX): the shard when sharded, else the chunk. Blocks must be multiples of this."""
        return tuple(int(v) for v in self._store.chunk_layout.write_chunk.shape)  # type: ignore[return-value]

    @property
    def read_chunk_shape(self) -> tuple[int, int, int]:
        """The smallest unit read from storage (inner chunk of a shard)."""
        return tuple(int(v) for v in self._store.chunk_layout.read_chunk.shape)  # type: ignore[return-value]

    @property
    def sharded(self) -> bool:
        return self.chunk_shape != self.read_chunk_shape

    @property
    def url(self) -> str:
        prefix = {"neuroglancer_precomputed": "precomputed"}.get(self.format, self.format)
        return f"{prefix}://{_url_of(self._root)}"

    def __reduce__(self):
        """Pickle as the spec, never the TensorStore handle: the receiving process re-opens it (no fork sharing)."""
        return (_reopen, (self.spec, self.mode, self.fill_missing))

    def __repr__(self) -> str:
        return (f"Volume({self.name!r}, {self.format}, shape_zyx={self.shape}, dtype={self.dtype}, "
                f"voxel_size_xyz={self.voxel_size}, voxel_offset_xyz={self.voxel_offset}, scale={self.scale})")

    # --- I/O --------------------------------------------------------------------------------------------------
    def _check_box(self, box: Box, what: str) -> Box:
        if not isinstance(box, Box):
            box = Box(*box) if isinstance(box, tuple) and len(box) == 2 else box
        if not isinstance(box, Box):
            raise VolumeError(f"cannot {what} {self.name}: expected a Box, got {type(box).__name__}")
        if box.empty:
            raise VolumeError(f"cannot {what} empty box {box} of {self.name}")
        if not self.bounds.contains(box):
            raise VolumeError(f"box {box} is outside volume {self.name} (bounds {self.bounds})")
        return box

    def read(self, box: Box) -> np.ndarray:
        """Voxels of `box` as a ZYX numpy array."""
        box = self._check_box(box, "read")
        try:
            return self._store[box.slices].read().result()
        except Exception as exc:
            raise VolumeError(f"cannot read {box} from {self.name}: {_short(exc)}") from None

    def write(self, box: Box, array: np.ndarray) -> None:
        """Write a ZYX array into `box`; the dtype must match the volume's exactly (no silent casts)."""
        if self.mode != "r+":
            raise VolumeError(f"volume {self.name} is open read-only; open it with mode='r+' to write")
        box = self._check_box(box, "write")
        array = np.asarray(array)
        if array.dtype != self.dtype:
            raise VolumeError(f"cannot write {array.dtype} data to {self.dtype} volume {self.name}; "
                              f"cast it first (e.g. array.astype('{self.dtype}'))")
        if tuple(array.shape) != box.shape:
            raise VolumeError(f"array shape {tuple(array.shape)} (zyx) does not match box {box} "
                              f"shape {box.shape} (zyx) for {self.name}")
        try:
            self._store[box.slices].write(array).result()
        except Exception as exc:
            raise VolumeError(f"cannot write {box} to {self.name}: {_short(exc)}") from None

    # --- scales -----------------------------------------------------------------------------------------------
    def at_scale(self, scale: int, mode: str | None = None) -> "Volume":
        """The same volume at another pyramid level (precomputed scale index / NGFF level / n5 sN)."""
        return _open_resolved(_resolve(self.format, self._root, scale, False, self.name),
                              mode or self.mode, self.fill_missing, self.name)

    def scale_voxel_sizes(self) -> list[tuple[float, float, float]]:
        found = _levels_of(self.format, self._root)
        return [lv.voxel_size_xyz for lv in found[0]] if found else [self.voxel_size]


def _reopen(spec: dict, mode: str, fill_missing: bool) -> "Volume":
    return open_volume(spec, mode=mode, fill_missing=fill_missing)


def _url_of(kvstore: dict) -> str:
    if kvstore.get("driver") == "file":
        return "file://" + kvstore["path"].rstrip("/")
    return kvstore_url(kvstore)


# --------------------------------------------------------------------------------------------------------------
# open
# --------------------------------------------------------------------------------------------------------------
_OUR_SPEC_KEYS = {"driver", "kvstore", "scale_index", "fill_missing_data_reads", "store_data_equal_to_fill_value",
                  "context", "dtype", "transform", "recheck_cached_data", "recheck_cached_metadata"}


def open_volume(url_or_spec: str | dict | Volume, *, mode: str = "r", fill_missing: bool = False,
                scale: int = 0) -> Volume:
    """Open an existing volume from a URL, a TensorStore JSON spec, or another Volume's spec.

    mode "r" reads, "r+" reads and writes. fill_missing=False makes a missing chunk an error naming the chunk
    (a half-finished stage should not read as zeros); True reads missing chunks as zeros.
    """
    if mode not in ("r", "r+"):
        raise VolumeError(f"mode must be 'r' or 'r+', got {mode!r}")
    if isinstance(url_or_spec, Volume):
        url_or_spec = url_or_spec.spec
    if isinstance(url_or_spec, dict):
        spec = dict(url_or_spec)
        driver = spec.get("driver")
        fmt = _FORMAT_NAMES.get(driver) if isinstance(driver, str) else None
        if fmt is None:
            raise VolumeError(f"TensorStore spec driver {driver!r} is not a volume format ({', '.join(FORMATS)})")
        kv = spec.get("kvstore")
        if isinstance(kv, str):
            kv = kvstore_spec(kv)
        if not isinstance(kv, dict) or not isinstance(kv.get("path", ""), str):
            raise VolumeError(f"TensorStore spec for {driver} has no kvstore: {json.dumps(spec, default=repr)[:200]}")
        kv = {**kv, "path": kv.get("path", "") if kv.get("path", "").endswith("/") or not kv.get("path")
              else kv["path"] + "/"}
        if "fill_missing_data_reads" in spec and not fill_missing:
            fill_missing = bool(spec["fill_missing_data_reads"])
        try:
            level = int(spec.get("scale_index", scale)) if fmt == "neuroglancer_precomputed" else scale
        except (TypeError, ValueError, OverflowError):
            raise VolumeError(f"TensorStore spec: scale_index must be an integer, got {spec.get('scale_index')!r}") from None
        name = kvstore_url(kv)
        resolved = _resolve(fmt, kv, level, False, name)
        extra = {k: v for k, v in spec.items() if k not in _OUR_SPEC_KEYS}
        return _open_resolved(resolved, mode, fill_missing, name, extra)
    parsed = parse_url(url_or_spec)
    name = kvstore_url(parsed.kvstore)
    fmt = parsed.format if parsed.format in FORMATS and not parsed.auto_zarr else None
    if parsed.format == "zarr3" and not parsed.url.startswith("zarr3://") and "|zarr3" not in parsed.url:
        fmt = None  # `.zarr` suffix: v2 or v3, whichever is there
    return _open_resolved(_resolve(fmt, parsed.kvstore, scale, parsed.auto_zarr, name), mode, fill_missing, name)


def _open_resolved(r: _Resolved, mode: str, fill_missing: bool, name: str, extra: dict | None = None) -> Volume:
    spec: dict = {"driver": r.format, "kvstore": r.array_kvstore, **(extra or {})}
    if r.format == "neuroglancer_precomputed":
        spec["scale_index"] = r.level
    spec["fill_missing_data_reads"] = bool(fill_missing)
    spec["store_data_equal_to_fill_value"] = True  # an all-zero chunk is data, not "missing"
    if r.layout != "precomputed" and len(r.levels) > 1:
        name = f"{name} (scale {r.level})"
    elif r.layout == "precomputed" and r.level:
        name = f"{name} (scale {r.level})"
    try:
        store = ts.open(spec, read=True, write=(mode == "r+"), context=ts_context()).result()
    except Exception as exc:
        raise VolumeError(f"cannot open {r.format} volume {name}: {_short(exc)}") from None
    level = r.levels[r.level]
    if r.format == "neuroglancer_precomputed":
        labels = list(store.domain.labels)
        if store.rank != 4 or labels[-1] != "channel":
            raise VolumeError(f"precomputed volume {name} has unexpected dimensions {labels}")
        if store.domain.shape[3] != 1:
            raise VolumeError(f"precomputed volume {name} has {store.domain.shape[3]} channels; only 1 is supported")
        view = store[ts.d["channel"][0]].T
        units = store.dimension_units
        voxel_size = tuple(float(u.multiplier) if u is not None else 1.0 for u in units[:3])
        offset = tuple(int(v) for v in store.domain.inclusive_min[:3])
    else:
        if store.rank != 3:
            raise VolumeError(f"volume {name} has {store.rank} dimensions; expected 3 (z, y, x)")
        view = store.T if r.format == "n5" else store  # n5 lists dimensions x,y,z
        voxel_size, offset = level.voxel_size_xyz, level.voxel_offset_xyz
        view = view.translate_to[tuple(reversed(offset))]
    kind = r.kind or ("segmentation" if np.dtype(view.dtype.numpy_dtype) in (np.uint32, np.uint64) else "image")
    return Volume(name=name, format=r.format, kind=kind, spec=_json_spec(spec), voxel_size=voxel_size,
                  voxel_offset=offset, scale=r.level, num_scales=len(r.levels), mode=mode,
                  fill_missing=bool(fill_missing), _store=view, _root=r.root)


def _json_spec(spec: dict) -> dict:
    return json.loads(json.dumps(spec))


# --------------------------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------------------------
def _positive_triple(values: Sequence[float], name: str, integer: bool = True) -> tuple:
    try:
        out = tuple(int(v) if integer else float(v) for v in values)
    except (TypeError, ValueError):
        raise VolumeError(f"{name} must be 3 numbers, got {values!r}") from None
    if len(out) != 3 or any(v <= 0 for v in out):
        raise VolumeError(f"{name} must be 3 positive numbers, got {values!r}")
    if integer and any(int(v) != v for v in values):
        raise VolumeError(f"{name} must be whole numbers, got {values!r}")
    return out


def create_volume(url: str, *, shape_zyx: Sequence[int], dtype: Any, voxel_size_xyz_nm: Sequence[float],
                  chunk_shape_zyx: Sequence[int], shard_shape_zyx: Sequence[int] | None = None,
                  kind: str = "image", voxel_offset_xyz: Sequence[int] = (0, 0, 0), format: str | None = None,
                  delete_existing: bool = False, encoding: str | None = None,
                  jpeg_quality: int | None = None) -> Volume:
    """Create a volume (scale 0) and return it open for writing (fill_missing=True: nothing is written yet).

    Defaults: zarr3 for plain paths; segmentation precomputed is compressed_segmentation, image precomputed raw
    (``encoding="jpeg"`` for uint8 EM: lossy, several times smaller, what large EM releases serve; ``jpeg_quality``
    1-100, TensorStore's default 75); a shard shape makes
    zarr3 use sharding_indexed (inner chunks = chunk_shape) and precomputed use neuroglancer_uint64_sharded_v1
    with shard parameters computed so that one shard is exactly one `shard_shape` box.
    """
    parsed = parse_url(url)
    fmt = _FORMAT_NAMES.get(format or "", None) if format else (parsed.format or "zarr3")
    if fmt is None:
        raise VolumeError(f"unknown volume format {format!r}; use one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise VolumeError(f"volume kind must be one of {KINDS}, got {kind!r}")
    shape = _positive_triple(shape_zyx, "shape_zyx")
    chunk = _positive_triple(chunk_shape_zyx, "chunk_shape_zyx")
    voxel_size = _positive_triple(voxel_size_xyz_nm, "voxel_size_xyz_nm", integer=False)
    try:
        offset = tuple(int(v) for v in voxel_offset_xyz)
        assert len(offset) == 3
    except Exception:
        raise VolumeError(f"voxel_offset_xyz must be 3 integers, got {voxel_offset_xyz!r}") from None
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise VolumeError(f"unknown dtype {dtype!r}") from None
    if encoding is not None:
        _check_encoding(encoding, fmt, kind, np_dtype)
    if jpeg_quality is not None and (encoding != "jpeg" or not 1 <= int(jpeg_quality) <= 100):
        raise VolumeError(f"jpeg_quality must be 1-100 and needs encoding='jpeg', got {jpeg_quality!r} "
                          f"with encoding {encoding!r}")
    shard = None
    if shard_shape_zyx is not None:
        shard = _positive_triple(shard_shape_zyx, "shard_shape_zyx")
        if any(s % c for s, c in zip(shard, chunk)):
            raise VolumeError(f"shard shape {shard} (zyx) must be a multiple of the chunk shape {chunk} (zyx)")
        if shard == chunk:
            shard = None
    root = parsed.kvstore
    name = kvstore_url(root)
    level = ngff.Level("0" if fmt in ("zarr", "zarr3") else ("s0" if fmt == "n5" else "0"), voxel_size, offset)
    array_kv = root if fmt == "neuroglancer_precomputed" else kvstore_join(root, level.path)
    if delete_existing:
        _kv(root).delete_range(ts.KvStore.KeyRange()).result()
    else:
        existing = detect_format(root) or (detect_format(array_kv) if array_kv != root else None)
        if existing is not None:
            raise VolumeError(f"{name} already exists ({existing}); pass delete_existing=True (CLI: --overwrite) "
                              "to replace it")
    spec = _array_create_spec(fmt, array_kv, shape, np_dtype, chunk, shard, kind, voxel_size, offset,
                              first_scale=True, encoding=encoding, jpeg_quality=jpeg_quality)
    try:
        ts.open(spec, create=True, context=ts_context()).result()
    except Exception as exc:
        raise VolumeError(f"cannot create {fmt} volume {name}: {_short(exc)}") from None
    _write_group_metadata(fmt, root, [level], kind, name=os.path.basename(name.rstrip("/")))
    vol = open_volume({"driver": fmt, "kvstore": array_kv, **({"scale_index": 0} if fmt ==
                       "neuroglancer_precomputed" else {})}, mode="r+", fill_missing=True)
    return vol


def _write_group_metadata(fmt: str, root: dict, levels: list[ngff.Level], kind: str, name: str = "") -> None:
    """NGFF multiscales (zarr) or n5 group attributes listing `levels`; precomputed's info is TensorStore's."""
    if fmt == "zarr3":
        attrs = ngff.group_attributes(levels, 3, name)
        attrs["connectome"] = {"kind": kind}
        write_json(root, "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    elif fmt == "zarr":
        attrs = ngff.group_attributes(levels, 2, name)
        attrs["connectome"] = {"kind": kind}
        write_json(root, ".zgroup", {"zarr_format": 2})
        write_json(root, ".zattrs", attrs)
    elif fmt == "n5":
        s0 = levels[0]
        write_json(root, "attributes.json", {
            "n5": "2.5.0", "multiScale": True, "connectome_kind": kind,
            "resolution": list(s0.voxel_size_xyz), "units": ["nm", "nm", "nm"],
            "pixelResolution": {"unit": "nm", "dimensions": list(s0.voxel_size_xyz)},
            "scales": [[lv.voxel_size_xyz[i] / s0.voxel_size_xyz[i] for i in range(3)] for lv in levels],
            "downsamplingFactors": [[lv.voxel_size_xyz[i] / s0.voxel_size_xyz[i] for i in range(3)]
                                    for lv in levels],
        })
        for lv in levels:  # each scale array carries its own resolution (n5-viewer, BigDataViewer, Neuroglancer)
            kv = kvstore_join(root, lv.path)
            attrs = read_json(kv, "attributes.json") or {}
            attrs.update({"resolution": list(lv.voxel_size_xyz), "units": ["nm", "nm", "nm"],
                          "pixelResolution": {"unit": "nm", "dimensions": list(lv.voxel_size_xyz)},
                          "voxel_offset": list(lv.voxel_offset_xyz), "axes": ["x", "y", "z"]})
            write_json(kv, "attributes.json", attrs)


def _blosc(dtype: np.dtype) -> dict:
    return {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3,
                                               "shuffle": "bitshuffle" if dtype.itemsize == 1 else "shuffle"}}


IMAGE_ENCODINGS = ("raw", "jpeg")
PRECOMPUTED_ENCODINGS = IMAGE_ENCODINGS + ("compressed_segmentation",)


def _check_encoding(encoding: str, fmt: str, kind: str, dtype: np.dtype) -> None:
    if fmt != "neuroglancer_precomputed":
        raise VolumeError(f"encoding {encoding!r} is for precomputed volumes; {fmt} compresses with blosc/zstd")
    if encoding not in PRECOMPUTED_ENCODINGS:
        raise VolumeError(f"unknown precomputed encoding {encoding!r}; use one of {', '.join(PRECOMPUTED_ENCODINGS)}")
    if encoding == "jpeg" and (kind != "image" or dtype != np.uint8):
        raise VolumeError(f"jpeg encoding needs a uint8 image, got a {dtype} {kind}")
    if encoding == "compressed_segmentation" and dtype not in (np.uint32, np.uint64):
        raise VolumeError(f"compressed_segmentation needs uint32 or uint64, got {dtype}")


def _array_create_spec(fmt: str, kv: dict, shape: tuple, dtype: np.dtype, chunk: tuple, shard: tuple | None,
                       kind: str, voxel_size: tuple, offset: tuple, first_scale: bool,
                       encoding: str | None = None, jpeg_quality: int | None = None) -> dict:
    """TensorStore create spec for one scale array (ZYX shape/chunk/shard); ``encoding`` only for precomputed
    (default: compressed_segmentation for uint32/uint64 segmentations, else raw)."""
    if fmt == "zarr3":
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}, _blosc(dtype)]
        if shard is not None:
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(chunk), "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
            grid = shard
        else:
            codecs, grid = inner, chunk
        meta = {"shape": list(shape), "data_type": dtype.name, "fill_value": 0,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
                "codecs": codecs, "dimension_names": ["z", "y", "x"]}
        return {"driver": "zarr3", "kvstore": kv, "metadata": meta}
    if fmt == "zarr":
        if shard is not None:
            raise VolumeError("zarr v2 has no sharding; use zarr3 (zarr3:// or a .zarr path) for sharded output")
        meta = {"shape": list(shape), "chunks": list(chunk), "dtype": dtype.str, "fill_value": 0, "order": "C",
                "dimension_separator": "/",
                "compressor": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1}}
        return {"driver": "zarr", "kvstore": kv, "metadata": meta}
    if fmt == "n5":
        if shard is not None:
            raise VolumeError("n5 has no sharding; use zarr3 or precomputed for sharded output")
        meta = {"dimensions": list(reversed(shape)), "blockSize": list(reversed(chunk)), "dataType": dtype.name,
                "compression": {"type": "zstd", "level": 3}}
        return {"driver": "n5", "kvstore": kv, "metadata": meta}
    if fmt == "neuroglancer_precomputed":
        shape_xyz, chunk_xyz = list(reversed(shape)), list(reversed(chunk))
        if encoding is None:
            encoding = "compressed_segmentation" if kind == "segmentation" and dtype in (np.uint32, np.uint64) \
                else "raw"
        scale: dict = {"size": shape_xyz, "resolution": list(voxel_size), "voxel_offset": list(offset),
                       "encoding": encoding, "chunk_size": chunk_xyz}
        if encoding == "compressed_segmentation":
            scale["compressed_segmentation_block_size"] = [min(8, c) for c in chunk_xyz]
        if encoding == "jpeg" and jpeg_quality is not None:
            scale["jpeg_quality"] = int(jpeg_quality)
        if shard is not None:
            scale["sharding"] = precomputed_sharding(shape_xyz, chunk_xyz, list(reversed(shard)))
        spec = {"driver": "neuroglancer_precomputed", "kvstore": kv, "scale_metadata": scale}
        if first_scale:
            spec["multiscale_metadata"] = {"type": kind, "data_type": dtype.name, "num_channels": 1}
        return spec
    raise VolumeError(f"unknown volume format {fmt!r}; use one of {', '.join(FORMATS)}")


def precomputed_sharding(size_xyz: Sequence[int], chunk_xyz: Sequence[int], shard_xyz: Sequence[int]) -> dict:
    """neuroglancer_uint64_sharded_v1 parameters making one shard exactly one `shard_xyz` box of chunks.

    Chunks are keyed by their compressed Morton code (bits interleaved x,y,z while each axis still has grid
    bits); with the identity hash, a shard is the set of codes sharing the bits above preshift+minishard, so the
    first k interleaved bits must describe the shard's extent along each axis.
    """
    grid_bits = [max(0, math.ceil(math.log2(math.ceil(s / c)))) for s, c in zip(size_xyz, chunk_xyz)]
    want = []
    for sh, c in zip(shard_xyz, chunk_xyz):
        n = sh // c
        if n * c != sh or n & (n - 1):
            raise VolumeError(f"precomputed shard shape {list(shard_xyz)} (xyz) must be the chunk shape "
                              f"{list(chunk_xyz)} times a power of two per axis")
        want.append(int(math.log2(n)))
    target = [min(w, g) for w, g in zip(want, grid_bits)]
    order = [axis for j in range(max(grid_bits + [0])) for axis in range(3) if j < grid_bits[axis]]
    counts, k, achievable = [0, 0, 0], 0, [[c for c in chunk_xyz]]
    while counts != target:
        if k >= len(order):
            break
        counts[order[k]] += 1
        k += 1
        achievable.append([c << n for c, n in zip(chunk_xyz, counts)])
    if counts != target:
        raise VolumeError(f"precomputed shard shape {list(shard_xyz)} (xyz) is not a Morton-aligned block of chunks "
                          f"for chunk {list(chunk_xyz)}; possible shard shapes: {achievable[:8]}")
    minishard_bits = min(k, 6)
    return {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": k - minishard_bits, "hash": "identity",
            "minishard_bits": minishard_bits, "shard_bits": max(0, sum(grid_bits) - k),
            "minishard_index_encoding": "gzip", "data_encoding": "gzip"}


def create_scale(vol: Volume, factor_xyz: Sequence[int], *, chunk_shape_zyx: Sequence[int] | None = None,
                 shard_shape_zyx: Sequence[int] | None = None) -> Volume:
    """Add (or re-open, if it already exists with the same voxel size) the next pyramid level of `vol`'s root.

    The new level's voxel size is `vol.voxel_size * factor`; shape = ceil(shape / factor); offset = floor(offset /
    factor). The level is recorded in the format's metadata (precomputed info scales, NGFF datasets, n5 sN).
    Run on the driver only (it rewrites shared metadata).
    """
    factor = _positive_triple(factor_xyz, "downsample factor")
    f_zyx = tuple(reversed(factor))
    found = _levels_of(vol.format, vol._root)
    assert found is not None
    levels, layout, _ = found
    voxel_size = tuple(float(v * f) for v, f in zip(vol.voxel_size, factor))
    offset = tuple(int(o // f) for o, f in zip(vol.voxel_offset, factor))
    shape_zyx = tuple(-(-(b - (o * f)) // f) for b, o, f in
                      zip(vol.bounds.stop, tuple(reversed(offset)), f_zyx))
    for i, lv in enumerate(levels):
        if i > vol.scale and np.allclose(lv.voxel_size_xyz, voxel_size):
            return vol.at_scale(i, mode="r+")
    if layout == "array":
        raise VolumeError(f"{vol.name} is a bare array, not a multiscale volume; cannot add a scale")
    chunk = tuple(int(c) for c in (chunk_shape_zyx or vol.read_chunk_shape))
    shard = tuple(int(s) for s in shard_shape_zyx) if shard_shape_zyx else (vol.chunk_shape if vol.sharded else None)
    if shard is not None:
        shard = tuple(s if s % c == 0 else c for s, c in zip(shard, chunk))
        if shard == chunk:
            shard = None
    n = len(levels)
    path = {"zarr": str(n), "zarr3": str(n), "n5": f"s{n}"}.get(vol.format, str(n))
    array_kv = vol._root if vol.format == "neuroglancer_precomputed" else kvstore_join(vol._root, path)
    encoding = quality = None  # precomputed: a new scale is encoded like the one it is made from (jpeg stays jpeg)
    if vol.format == "neuroglancer_precomputed":
        source = ((read_json(vol._root, "info") or {}).get("scales") or [])[vol.scale]
        encoding, quality = source.get("encoding"), source.get("jpeg_quality")
    try:
        spec = _array_create_spec(vol.format, array_kv, shape_zyx, vol.dtype, chunk, shard, vol.kind, voxel_size,
                                  offset, first_scale=False, encoding=encoding, jpeg_quality=quality)
    except VolumeError:
        if shard is None or vol.format != "neuroglancer_precomputed":
            raise
        # the level-0 shard shape is not a Morton block of this smaller grid: store this level unsharded
        spec = _array_create_spec(vol.format, array_kv, shape_zyx, vol.dtype, chunk, None, vol.kind, voxel_size,
                                  offset, first_scale=False, encoding=encoding, jpeg_quality=quality)
    try:
        if vol.format == "neuroglancer_precomputed":
            ts.open(spec, create=True, open=True, context=ts_context()).result()
        else:
            ts.open(spec, create=True, delete_existing=True, context=ts_context()).result()
    except Exception as exc:
        raise VolumeError(f"cannot add scale {n} to {vol.name}: {_short(exc)}") from None
    new_level = ngff.Level(path, voxel_size, offset)  # type: ignore[arg-type]
    if vol.format != "neuroglancer_precomputed":
        _write_group_metadata(vol.format, vol._root, levels + [new_level], vol.kind,
                              name=os.path.basename(kvstore_url(vol._root).rstrip("/")))
    return vol.at_scale(n, mode="r+")
