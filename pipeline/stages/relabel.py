"""relabel: apply the fragment -> segment lookup table blockwise and collect per-segment statistics.

The table is a sorted pair of arrays, so a block maps its few hundred distinct ids by binary search instead of
building a dictionary of the whole table. Statistics (voxel count, bounding box, centroid sums) are computed in the
same pass and summed on the driver, so the final volume is read once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from storage.box import Block
from storage.volume import open_volume

_LUT_CACHE: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}


def load_lookup(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(fragment_ids sorted, segment_ids) from the Parquet table; cached per worker and file version."""
    key = (str(path), Path(path).stat().st_mtime)
    if key not in _LUT_CACHE:
        table = pq.read_table(path, columns=["fragment_id", "segment_id"])
        frag = table["fragment_id"].to_numpy().astype(np.uint64)
        seg = table["segment_id"].to_numpy().astype(np.uint64)
        order = np.argsort(frag, kind="stable")
        _LUT_CACHE.clear()
        _LUT_CACHE[key] = (frag[order], seg[order])
    return _LUT_CACHE[key]


def apply_lookup(labels: np.ndarray, fragments: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Map ids through the table; 0 stays 0 and ids missing from the table are an error (a lost fragment)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    idx = np.searchsorted(fragments, uniq)
    idx_c = np.minimum(idx, max(len(fragments) - 1, 0))
    found = (idx < len(fragments)) & (fragments[idx_c] == uniq) if len(fragments) else np.zeros(len(uniq), bool)
    missing = (~found) & (uniq != 0)
    if missing.any():
        raise ValueError(f"fragment id {int(uniq[missing][0])} is not in the lookup table")
    mapped = np.where(uniq == 0, np.uint64(0), segments[idx_c] if len(fragments) else np.uint64(0))
    return mapped.astype(np.uint64)[inverse].reshape(labels.shape)


def segment_statistics(labels: np.ndarray, origin_zyx: tuple[int, int, int]) -> pd.DataFrame:
    """Per id: voxel count, bbox (inclusive min, exclusive max, ZYX voxels) and coordinate sums for centroids."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    n = len(uniq)
    counts = np.bincount(inverse.ravel(), minlength=n)
    data = {"segment_id": uniq, "voxel_count": counts}
    for axis, name in enumerate("zyx"):
        coord = np.arange(labels.shape[axis], dtype=np.int64) + origin_zyx[axis]
        shape = [1, 1, 1]
        shape[axis] = -1
        full = np.broadcast_to(coord.reshape(shape), labels.shape).ravel()
        data[f"sum_{name}"] = np.bincount(inverse.ravel(), weights=full, minlength=n)
        lo = np.full(n, np.iinfo(np.int64).max)
        hi = np.full(n, np.iinfo(np.int64).min)
        np.minimum.at(lo, inverse.ravel(), full)
        np.maximum.at(hi, inverse.ravel(), full)
        data[f"min_{name}"] = lo
        data[f"max_{name}"] = hi + 1
    df = pd.DataFrame(data)
    return df[df["segment_id"] != 0].reset_index(drop=True)


def combine_statistics(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Sum per-block statistics into one row per segment."""
    if not parts:
        return segment_statistics(np.zeros((1, 1, 1), np.uint64), (0, 0, 0))
    df = pd.concat(parts, ignore_index=True)
    agg = {"voxel_count": "sum", "sum_z": "sum", "sum_y": "sum", "sum_x": "sum",
           "min_z": "min", "min_y": "min", "min_x": "min", "max_z": "max", "max_y": "max", "max_x": "max"}
    return df.groupby("segment_id", sort=True).agg(agg).reset_index()


def relabel_block(block: Block, *, fragments_spec: dict, output_spec: dict, lookup_path: str,
                  lookup_digest: str = "") -> dict:
    """Write the final ids of this write box; `lookup_digest` only keys the ledger to the table's content."""
    fragments, segments = load_lookup(lookup_path)
    labels = open_volume(fragments_spec).read(block.write)
    out = apply_lookup(labels, fragments, segments)
    open_volume(output_spec, mode="r+").write(block.write, out)
    stats = segment_statistics(out, block.write.start)
    return {"stats": stats.to_dict(orient="list")}
