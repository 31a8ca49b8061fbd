"""Synapse annotations in Neuroglancer's precomputed annotation format (``neuroglancer_annotations_v1``).

Each synapse is a LINE from its presynaptic point to its postsynaptic point (nm, x/y/z dimensions of 1 nm),
with properties ``score`` (float32) and ``size`` (int32, voxels), and relationships ``pre_segment`` and
``post_segment`` so that selecting a segment in the viewer lists (and filters to) its synapses.

Written indexes (annotation.rst): ``by_id`` (single-annotation encoding incl. related ids), one index per
relationship (multiple-annotation encoding), and a multi-level spatial index: level 0 is one cell over the
bounds, each further level halves the cell along the dimensions where that keeps cells closest to
isotropic, and every level emits a uniform random subset (probability ``min(1, limit / maxCount)``) of the
annotations still remaining, the rest going down a level, until none remain. The random draw is a hash
of the annotation id, so the output is deterministic and an annotation spanning several cells is emitted at
the same level in all of them. Above `shard_threshold` annotations every index is sharded (TensorStore's
``neuroglancer_uint64_sharded`` kvstore; spatial keys are compressed Morton codes).

This writer holds the table in memory (about 100 bytes per synapse), which covers tens of millions of synapses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import tensorstore as ts

from storage.errors import ConnectomeError

from viz.kvstore import hashed_sharding, join, open_kvstore, write_json, write_uint64_index

RELATIONSHIPS = ("pre_segment", "post_segment")
PROPERTIES = (
    {"id": "score", "type": "float32", "description": "synapse detection score"},
    # int32, not uint32: neuroglancer's Python reader (2.41) mis-aligns uint32 properties
    {"id": "size", "type": "int32", "description": "cleft size (voxels)"},
)
RECORD_DTYPE = np.dtype([("geometry", "<f4", (6,)), ("score", "<f4"), ("size", "<i4")])  # 32 bytes, 4-aligned


@dataclass(frozen=True)
class AnnotationOptions:
    limit: int = 1000  # max annotations per spatial cell per level (Neuroglancer's display density)
    shard_threshold: int = 10_000  # shard every index above this many annotations
    sharded: bool | None = None  # force on/off; None = by threshold


def _column(df: pd.DataFrame, *names: str) -> np.ndarray:
    for name in names:
        if name in df.columns:
            return df[name].to_numpy()
    raise ConnectomeError(f"synapse table lacks one of the columns {names} (has {list(df.columns)})")


def synapse_records(synapses: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids uint64, records RECORD_DTYPE, pre ids, post ids) from a store-style synapse table.

    Endpoints: ``pre_{x,y,z}_nm`` -> ``post_{x,y,z}_nm``; a synapse without them is drawn at its cleft
    ``{x,y,z}_nm`` (a zero-length line).
    """
    n = len(synapses)
    ids = _column(synapses, "synapse_id").astype(np.uint64)
    if len(np.unique(ids)) != n:
        raise ConnectomeError("synapse table has duplicate synapse_id values")
    cleft = np.stack([_column(synapses, f"{a}_nm") for a in "xyz"], axis=1).astype(np.float64)

    def endpoint(prefix: str) -> np.ndarray:
        cols = [f"{prefix}_{a}_nm" for a in "xyz"]
        if all(c in synapses.columns for c in cols):
            pts = synapses[cols].to_numpy(np.float64)
            return np.where(np.isnan(pts), cleft, pts)
        return cleft

    records = np.zeros(n, RECORD_DTYPE)
    records["geometry"][:, :3] = endpoint("pre")
    records["geometry"][:, 3:] = endpoint("post")
    records["score"] = synapses["score"].fillna(0).to_numpy(np.float32) if "score" in synapses else 0
    size = synapses["size_voxels"] if "size_voxels" in synapses else synapses.get("size")
    records["size"] = np.clip(size.fillna(0).to_numpy(np.float64), 0, 2**31 - 1) if size is not None else 0
    pre = _column(synapses, "pre_segment_id").astype(np.int64)
    post = _column(synapses, "post_segment_id").astype(np.int64)
    return ids, records, pre, post


def _uniform_from_ids(ids: np.ndarray) -> np.ndarray:
    """A deterministic uniform [0, 1) value per id (splitmix64 finaliser)."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def compressed_morton(cell: np.ndarray, grid_shape: np.ndarray) -> np.ndarray:
    """Compressed Morton code (Neuroglancer's, bits interleaved x,y,z only while a dimension needs them)."""
    cell = np.asarray(cell, dtype=np.uint64).reshape(-1, 3)
    bits = [int(np.ceil(np.log2(g))) if g > 1 else 0 for g in grid_shape]
    out = np.zeros(len(cell), np.uint64)
    j = 0
    for bit in range(max(bits) if bits else 0):
        for dim in range(3):
            if bit < bits[dim]:
                out |= ((cell[:, dim] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(j)
                j += 1
    return out


def _encode_list(records: np.ndarray, ids: np.ndarray) -> bytes:
    return np.uint64(len(ids)).astype("<u8").tobytes() + records.tobytes() + ids.astype("<u8").tobytes()


MIN_CHUNK_NM = 1.0  # cells are never refined below this


def _next_chunk(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Halve the dimensions that are at least half the largest one (keeps cells near isotropic)."""
    factor = np.where((chunk >= chunk.max() / 2) & (chunk / 2 >= MIN_CHUNK_NM), 2, 1)
    return chunk / factor, factor


MAX_SPATIAL_LEVELS = 16  # the last level takes everything left (many annotations at one spot would never thin out)


def spatial_levels(
    ids: np.ndarray, lower: np.ndarray, upper: np.ndarray, lo: np.ndarray, hi: np.ndarray, limit: int
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[tuple[int, int, int], np.ndarray]]]:
    """Yield (grid_shape, chunk_size, {cell: annotation indices}) coarse to fine until every annotation is emitted.

    `lo`/`hi` are per-annotation bounding boxes; an annotation belongs to every cell its box touches.
    """
    if limit < 1:
        raise ConnectomeError(f"spatial index limit must be at least 1, got {limit}")
    extent = upper - lower
    grid = np.ones(3, np.int64)
    chunk = extent.astype(np.float64)
    remaining = np.arange(len(ids))
    u = _uniform_from_ids(ids)
    level = 0
    while remaining.size:
        c_lo = np.clip(np.floor((lo[remaining] - lower) / chunk).astype(np.int64), 0, grid - 1)
        c_hi = np.clip(np.floor((hi[remaining] - lower) / chunk).astype(np.int64), 0, grid - 1)
        span = c_hi - c_lo + 1
        reps = np.prod(span, axis=1)
        owner = np.repeat(np.arange(remaining.size), reps)
        # enumerate the cells of each annotation's box: offset k -> (dx, dy, dz) within its span
        k = np.arange(len(owner)) - np.repeat(np.cumsum(reps) - reps, reps)
        s = span[owner]
        d0 = k % s[:, 0]
        d1 = (k // s[:, 0]) % s[:, 1]
        d2 = k // (s[:, 0] * s[:, 1])
        cells = c_lo[owner] + np.stack([d0, d1, d2], axis=1)
        flat = np.ravel_multi_index(cells.T, tuple(int(g) for g in grid))
        max_count = np.unique(flat, return_counts=True)[1].max()
        last = level == MAX_SPATIAL_LEVELS - 1 or np.all(_next_chunk(chunk)[1] == 1)
        p = 1.0 if last else min(1.0, limit / max_count)
        emit_mask = u[remaining] < p if p < 1.0 else np.ones(remaining.size, bool)
        keep = emit_mask[owner]
        by_cell: dict[tuple[int, int, int], np.ndarray] = {}
        if keep.any():
            e_flat, e_idx = flat[keep], remaining[owner[keep]]
            order = np.lexsort((u[e_idx], e_flat))  # group by cell, pseudo-random order inside a cell
            e_flat, e_idx = e_flat[order], e_idx[order]
            starts = np.flatnonzero(np.r_[True, e_flat[1:] != e_flat[:-1]])
            for a, b in zip(starts, np.r_[starts[1:], len(e_flat)]):
                cell = tuple(int(v) for v in np.unravel_index(e_flat[a], tuple(grid)))
                by_cell[cell] = e_idx[a:b]  # type: ignore[index]
        yield grid.copy(), chunk.copy(), by_cell
        remaining = remaining[~emit_mask]
        chunk, factor = _next_chunk(chunk)
        grid = grid * factor
        level += 1


def write_synapse_annotations(
    dest: str | os.PathLike, synapses: pd.DataFrame, options: AnnotationOptions = AnnotationOptions()
) -> dict:
    """Write the synapse table as a precomputed annotation collection under `dest`; returns the info."""
    ids, records, pre, post = synapse_records(synapses)
    n = len(ids)
    geometry = records["geometry"].astype(np.float64)
    lo = np.minimum(geometry[:, :3], geometry[:, 3:])
    hi = np.maximum(geometry[:, :3], geometry[:, 3:])
    if n:
        lower = np.floor(lo.min(axis=0))
        upper = np.ceil(hi.max(axis=0)) + 1.0  # strictly above every point, so no extent is zero
    else:
        lower, upper = np.zeros(3), np.ones(3)
    sharded = options.sharded if options.sharded is not None else n > options.shard_threshold

    def sharding(count: int) -> dict | None:
        return hashed_sharding(count) if sharded else None

    spatial_meta: list[dict[str, Any]] = []
    spatial_data: list[tuple[str, list[tuple[int, bytes]], dict | None]] = []
    for level, (grid, chunk, by_cell) in enumerate(spatial_levels(ids, lower, upper, lo, hi, options.limit)):
        key = f"spatial{level}"
        meta: dict[str, Any] = {
            "key": key, "grid_shape": [int(g) for g in grid], "chunk_size": [float(c) for c in chunk],
            "limit": int(options.limit),
        }
        shard = sharding(len(by_cell))
        if shard is not None:
            shard = {**shard, "hash": "identity"}  # Morton keys are already spread out
            meta["sharding"] = shard
            cells = np.array(list(by_cell), dtype=np.int64).reshape(-1, 3)
            keys = compressed_morton(cells, grid)
            items = [(int(k), _encode_list(records[idx], ids[idx])) for k, idx in zip(keys, by_cell.values())]
        else:
            items = [("_".join(map(str, cell)), _encode_list(records[idx], ids[idx])) for cell, idx in by_cell.items()]  # type: ignore[misc]
        spatial_meta.append(meta)
        spatial_data.append((key, items, shard))

    by_id_sharding = sharding(n)
    info: dict[str, Any] = {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": {"x": [1e-9, "m"], "y": [1e-9, "m"], "z": [1e-9, "m"]},
        "lower_bound": [float(v) for v in lower],
        "upper_bound": [float(v) for v in upper],
        "annotation_type": "LINE",
        "properties": [dict(p) for p in PROPERTIES],
        "relationships": [],
        "by_id": {"key": "by_id", **({"sharding": by_id_sharding} if by_id_sharding else {})},
        "spatial": spatial_meta,
    }

    open_kvstore(dest).delete_range(ts.KvStore.KeyRange("info", "info\0")).result()  # stale info must not outlive a rewrite
    for key, items, shard in spatial_data:
        if shard is None:
            kv = open_kvstore(join(dest, key))
            for f in [kv.write(name, data) for name, data in items]:
                f.result()
        else:
            write_uint64_index(join(dest, key), items, shard)

    # by_id: record + for each relationship (uint32 count, uint64 ids)
    # a zero partner id means "none": encode an empty list for it
    def single(i: int) -> bytes:
        parts = [records[i].tobytes()]
        for seg in (pre[i], post[i]):
            parts.append(np.uint32(1 if seg > 0 else 0).astype("<u4").tobytes())
            if seg > 0:
                parts.append(np.uint64(seg).astype("<u8").tobytes())
        return b"".join(parts)

    write_uint64_index(join(dest, "by_id"), ((int(ids[i]), single(i)) for i in range(n)), by_id_sharding)

    for name, segs in zip(RELATIONSHIPS, (pre, post)):
        valid = segs > 0
        order = np.argsort(segs[valid], kind="stable")
        idx = np.flatnonzero(valid)[order]
        seg_sorted = segs[idx]
        starts = np.flatnonzero(np.r_[True, seg_sorted[1:] != seg_sorted[:-1]]) if idx.size else np.array([], int)
        ends = np.r_[starts[1:], len(idx)]
        rel_sharding = sharding(len(starts))
        meta = {"id": name, "key": f"rel_{name}", **({"sharding": rel_sharding} if rel_sharding else {})}
        info["relationships"].append(meta)
        items = ((int(seg_sorted[a]), _encode_list(records[idx[a:b]], ids[idx[a:b]])) for a, b in zip(starts, ends))
        write_uint64_index(join(dest, meta["key"]), items, rel_sharding)

    write_json(dest, "info", info)  # last: an interrupted write never looks finished
    return info
