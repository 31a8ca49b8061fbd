"""Whole-volume segmentation: segment -> reconcile -> (agglomerate) -> relabel -> pyramid, on Dask.

The driver holds only ids and small per-block metadata; voxels move between workers and storage only. Every stage
goes through the runner's ledger, so a killed driver resumes where it stopped, and the lookup tables are written
atomically before the stage that needs them starts.

Run directory layout (OUT):
  OUT/fragments          precomputed uint64, block-unique FFN fragments (the supervoxels proofreading splits by)
  OUT/segmentation       precomputed uint64, compressed_segmentation, sharded, with a downsampled pyramid
  OUT/reconcile.parquet  fragment -> segment after reconciliation (before agglomeration)
  OUT/lookup.parquet     fragment -> final segment id (what relabel applied; also stored as the store's id_map)
  OUT/work/              per-block side files and ledgers
  OUT/connectome.duckdb  segments and id_map rows (the store)
  OUT/agglomeration_edges.parquet  scored contacts between reconciled segments (when agglomeration ran)

Block invariance. A block segments its read box (write box + `overlap`) and writes its write box; reconcile
matches fragments of face neighbours in the central band of their overlap (`match_band`), where both blocks are
at least half an overlap away from their read-box border; seeds come from the image around the read box
(`seed_context`) with position-based tie-breaking, in global order, and only within `seed_reach` of the write
box (pipeline/stages/segment.py says why). `overlap` should be at least FOV radius + deltas of the model, and
2 x that where an object's body may lie in the overlap (it must be seedable by the block).
Write-box voxels a block left at 0 (an object seeded only on the neighbour's side) take the neighbour's fragment
there (`fill_holes`, in reconcile). Faces of a read box on the volume border are mirror-padded by the FOV radius
(ffn.inference.segment_volumes) so border objects are segmented as in the one-block run. On the machinery test
(hand-set grow model on EM whose membranes are the ground-truth boundaries, tests/test_segment_pipeline.py)
1 vs 2x2x2 blocks went from VOI 0.30 to 0.04 with filling, 0.13 with border padding (face-max movement misses
forks, so the one-block run itself depends on seed order), 0.030 with `movement: face_components` and 0.017 /
ARAND 0.0023 / no extra cut objects with a z overlap of 2 x (FOV radius + delta): the block machinery is
invariant when the model's floods are.
What this cannot fix is an FFN whose objects depend on where flooding starts. Measured 2026-11-29 on the test
volume (synthetic seed 7, 32x128x128), one process, no blocks: the packaged `synthetic_small` (100k steps) forward
vs reverse seed order differ by VOI 1.54 / ARAND 0.19, and 1 block vs 2x2x2 blocks by VOI 1.74 / ARAND 0.24 (the
previous 21.6k-step model, which left most voxels unlabelled: 4.1 / 0.69 and 0.57 / 0.20; the FIB-25 model
fine-tuned 2k steps on synthetic data 1.88 / 0.58 between block layouts), i.e. about the model's own
instability; the invariance target (VOI <= 0.05) needs a model whose floods are stable. On quality
the blockwise result is within 5 % of the one-block result
(benchmarks/segment_quality.py --xy 128 --seeds 11 12: blockwise / one-block VOI 0.90 and 0.97 synthetic,
1.04 medulla).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.agglomerate import (AgglomerationParams, agglomerated_lookup, edges_block, merge_decisions,
                                         rule_for_model, score_edges)
from pipeline.stages.reconcile import build_lookup, reconcile_block
from pipeline.stages.relabel import combine_statistics, relabel_block
from pipeline.stages.segment import segment_block
from storage.box import BlockGrid, label_stride
from storage.errors import ConfigError
from storage.volume import create_volume, open_volume


DEFAULT_CHUNK = (32, 64, 64)


@dataclass
class SegmentConfig:
    """What `connectome segment` needs.

    Shapes (block_shape, overlap, chunk_shape) are Z Y X, as numpy prints a shape and as the CLI flags take them
    (`--block-shape Z Y X`); voxel sizes elsewhere are X Y Z as Neuroglancer shows them.
    """

    input: str = ""
    output: str = ""
    model: str = "synthetic_small"
    block_shape: tuple[int, int, int] = (64, 128, 128)
    overlap: tuple[int, int, int] = (16, 16, 16)
    gpu: bool = False
    tf_threads: int | None = 1  # TF intra-op threads per block task (None = TF default: every core)
    inference: dict = field(default_factory=dict)
    min_overlap_voxels: int = 50
    min_overlap_fraction: float = 0.5
    match_band: float = 0.5  # match fragments within this fraction of the overlap on each side of a block face
    seed_context: tuple[int, int, int] | None = None  # image read around a read box for seeds; default = overlap
    seed_reach: float | None = 0.5  # seeds only within this fraction of the overlap outside the write box
    fill_holes: bool = True  # write-box voxels a block left at 0 take a neighbour's fragment there
    agglomerate: bool | None = None  # None: as recorded with the model (rule_for_model)
    agglomeration: AgglomerationParams | None = None  # None: the rule recorded with the model (rule_for_model)
    pyramid_levels: int = 2
    chunk_shape: tuple[int, int, int] | None = None  # default: block_shape capped at (32, 64, 64)
    fill_missing: bool = False
    restart: bool = False

    def validate(self) -> None:
        if self.chunk_shape is None:
            # the same power-of-two number of chunks per axis in a shard: always a Morton-aligned precomputed shard
            # (e.g. block 64^3 with chunks (32, 64, 64) is not one)
            ratio = min(max(1, int(b) // c) for b, c in zip(self.block_shape, DEFAULT_CHUNK))
            ratio = 1 << (ratio.bit_length() - 1)
            self.chunk_shape = tuple(max(1, int(b) // ratio) for b in self.block_shape)
        if not self.input:
            raise ConfigError("segment config: field 'input' is required (a volume URL or path)")
        if not self.output:
            raise ConfigError("segment config: field 'output' is required (a run directory)")
        for name in ("block_shape", "chunk_shape"):
            v = getattr(self, name)
            if len(v) != 3 or any(int(x) <= 0 for x in v):
                raise ConfigError(f"segment config: field '{name}' must be 3 positive integers (ZYX), got {list(v)}")
        if len(self.overlap) != 3 or any(int(x) < 0 for x in self.overlap):
            raise ConfigError(f"segment config: field 'overlap' must be 3 non-negative integers (ZYX), got {list(self.overlap)}")
        ratios = [b / c for b, c in zip(self.block_shape, self.chunk_shape)]
        if any(r < 1 or r != int(r) or int(r) & (int(r) - 1) for r in ratios):
            raise ConfigError(f"segment config: block_shape {list(self.block_shape)} must be chunk_shape "
                              f"{list(self.chunk_shape)} times a power of two per axis (one block = one shard)")
        if not 0 < self.match_band <= 1:
            raise ConfigError(f"segment config: field 'match_band' must be in (0, 1], got {self.match_band}")
        if self.seed_reach is not None and not 0 <= self.seed_reach <= 1:
            raise ConfigError(f"segment config: field 'seed_reach' must be in [0, 1] or null, got {self.seed_reach}")
        if self.seed_context is not None and (len(self.seed_context) != 3 or any(int(x) < 0 for x in self.seed_context)):
            raise ConfigError(f"segment config: field 'seed_context' must be 3 non-negative integers (ZYX), "
                              f"got {list(self.seed_context)}")
        if not 0 < self.min_overlap_fraction <= 1:
            raise ConfigError(f"segment config: field 'min_overlap_fraction' must be in (0, 1], got {self.min_overlap_fraction}")


def _zyx(shape) -> tuple[int, int, int]:
    return tuple(int(v) for v in shape)  # type: ignore[return-value]


def lookup_digest(lookup: pd.DataFrame) -> str:
    """Content hash of a lookup table. It goes into the parameters of the stages that read the table, so their
    ledgers (keyed by parameters) refuse or redo finished blocks when the table changed, e.g. a rerun in the same
    directory with other agglomeration settings must not keep the old relabelled blocks."""
    import hashlib

    h = hashlib.sha256()
    for col in ("fragment_id", "segment_id"):
        h.update(np.ascontiguousarray(lookup[col].to_numpy(np.uint64)).tobytes())
    return h.hexdigest()[:16]


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, path)


@dataclass
class StageTimer:
    seconds: dict = field(default_factory=dict)

    def run(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def run_segmentation(config: SegmentConfig, client, *, progress: bool = True) -> dict:
    """Segment `config.input` into `config.output`; returns a summary (stage times, counts)."""
    from ffn.model import load_model, resolve_model
    from pipeline.runner import run_blockwise

    config.validate()
    # input and model are checked before anything is written, so a bad one leaves no output folder behind
    source = open_volume(config.input, fill_missing=config.fill_missing)
    if config.fill_missing:  # say so: a gap in the input becomes background instead of an error
        print(f"[segment] fill_missing is on: missing chunks of {source.name} are read as zeros", file=sys.stderr,
              flush=True)
    if np.dtype(source.dtype) != np.uint8:
        raise ConfigError(f"segment: input {config.input} has dtype {source.dtype}; FFN models take uint8 EM")
    model_dir = str(resolve_model(config.model))
    _, ffn_config = load_model(model_dir)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    (work / "segment").mkdir(parents=True, exist_ok=True)
    ledgers = work / "ledgers"
    rule = rule_for_model(ffn_config.metadata, where=str(Path(model_dir) / "config.json"))
    agglomerate = rule.enabled if config.agglomerate is None else config.agglomerate
    agg_params = rule.params if config.agglomeration is None else config.agglomeration

    block_zyx = _zyx(config.block_shape)
    overlap_zyx = _zyx(config.overlap)
    chunk_zyx = _zyx(config.chunk_shape)
    grid = BlockGrid(source.bounds, block_zyx, overlap_zyx, chunk_zyx)
    stride = label_stride(block_zyx, overlap_zyx)
    resources = {"GPU": 1} if config.gpu else None

    common = dict(shape_zyx=source.shape, voxel_size_xyz_nm=source.voxel_size, voxel_offset_xyz=source.voxel_offset,
                  dtype="uint64", kind="segmentation")
    fragments = _open_or_create(out / "fragments", chunk_zyx, None, common)
    segmentation = _open_or_create(out / "segmentation", chunk_zyx, block_zyx, common)

    timer = StageTimer()
    seg_results = timer.run("segment", run_blockwise, "segment", grid, segment_block, params=dict(
        input_spec=source.spec, fragments_spec=fragments.spec, work_dir=str(work / "segment"), model_dir=model_dir,
        stride=stride, inference=dict(config.inference), fill_missing=config.fill_missing,
        tf_threads=config.tf_threads, seed_context=list(_zyx(config.seed_context if config.seed_context is not None else overlap_zyx)),
        seed_reach=None if config.seed_reach is None else [int(round(config.seed_reach * h)) for h in overlap_zyx],
    ), client=client, ledger_dir=ledgers, resources=resources, restart=config.restart, progress=progress)

    rec_results = timer.run("reconcile", run_blockwise, "reconcile", grid, reconcile_block, params=dict(
        grid_json=grid.to_json(), work_dir=str(work / "segment"), stride=stride,
        min_voxels=config.min_overlap_voxels, min_fraction=config.min_overlap_fraction, match_band=config.match_band,
        fragments_spec=fragments.spec if config.fill_holes else None,
    ), client=client, ledger_dir=ledgers, restart=config.restart, progress=progress)

    t0 = time.perf_counter()
    fragment_ids = np.unique(np.concatenate(
        [np.asarray(r["fragments"], dtype=np.uint64) for r in seg_results.values()] + [np.zeros(0, np.uint64)]))
    equivalences = np.concatenate(
        [np.asarray(r["equivalences"], dtype=np.uint64).reshape(-1, 2) for r in rec_results.values()]
        + [np.zeros((0, 2), np.uint64)])
    lookup = build_lookup(fragment_ids, equivalences)
    write_parquet_atomic(lookup, out / "reconcile.parquet")
    timer.seconds["reconcile"] += time.perf_counter() - t0

    merges = 0
    if agglomerate:
        agg_grid = BlockGrid(source.bounds, block_zyx, (agg_params.expand_voxels + 1,) * 3, chunk_zyx)
        edge_results = timer.run("agglomerate", run_blockwise, "agglomerate", agg_grid, edges_block, params=dict(
            fragments_spec=fragments.spec, image_spec=source.spec, lookup_path=str(out / "reconcile.parquet"),
            expand_voxels=agg_params.expand_voxels, fill_missing=config.fill_missing,
            lookup_digest=lookup_digest(lookup),
        ), client=client, ledger_dir=ledgers, restart=config.restart, progress=progress)
        edges = pd.concat([pd.DataFrame(r["edges"]) for r in edge_results.values()], ignore_index=True) \
            if edge_results else pd.DataFrame()
        seg_int = pd.concat([pd.DataFrame(r.get("segments", {})) for r in edge_results.values()], ignore_index=True) \
            if edge_results else pd.DataFrame()
        if len(edges):
            scored = score_edges(edges, seg_int)
            write_parquet_atomic(scored, out / "agglomeration_edges.parquet")  # for tuning and proofreading
            decisions = merge_decisions(scored, agg_params)
        else:
            decisions = pd.DataFrame(columns=["a", "b"])
        merges = len(decisions)
        lookup = agglomerated_lookup(lookup, decisions)
    write_parquet_atomic(lookup, out / "lookup.parquet")

    rel_results = timer.run("relabel", run_blockwise, "relabel", grid, relabel_block, params=dict(
        fragments_spec=fragments.spec, output_spec=segmentation.spec, lookup_path=str(out / "lookup.parquet"),
        lookup_digest=lookup_digest(lookup),
    ), client=client, ledger_dir=ledgers, restart=config.restart, progress=progress)
    stats = combine_statistics([pd.DataFrame(r["stats"]) for r in rel_results.values()])

    if config.pyramid_levels > 0:
        timer.run("pyramid", _build_pyramid, segmentation, config, client, ledgers, progress)

    t0 = time.perf_counter()
    _write_store(out, stats, lookup, seg_results, source.voxel_size)
    timer.seconds["store"] = time.perf_counter() - t0

    summary = {
        "blocks": grid.num_blocks,
        "fragments": int(len(fragment_ids)),
        "equivalences": int(len(equivalences)),
        "merges": int(merges),
        "agglomeration": {"on": bool(agglomerate), "source": {
            "on": "config" if config.agglomerate is not None else rule.source,
            "params": "config" if config.agglomeration is not None else rule.source}, **agg_params.__dict__},
        "segments": int(len(stats)),
        "steps": int(sum(r.get("steps", 0) for r in seg_results.values())),
        "voxels": int(np.prod(source.shape)),
        "stage_seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "segmentation": str(out / "segmentation"),
    }
    (out / "segment_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _open_or_create(path: Path, chunk_zyx, shard_zyx, common: dict):
    """Outputs are created once on the driver (workers only write chunks) and reused on resume."""
    url = f"precomputed://{path}"
    if (path / "info").exists():
        # fill_missing as create_volume opens it: the spec (part of each stage's ledger fingerprint) must be the
        # same on a resumed run, and blocks not yet written are legitimately missing
        return open_volume(url, mode="r+", fill_missing=True)
    return create_volume(url, chunk_shape_zyx=chunk_zyx, shard_shape_zyx=shard_zyx, **common)


def pyramid_factor(voxel_size_xyz) -> tuple[int, int, int]:
    """2x2x1 while z is coarser than x/y by 2x or more (keeps levels near isotropic, as igneous does), else 2x2x2."""
    x, y, z = voxel_size_xyz
    return (2, 2, 1) if z >= 2 * max(x, y) else (2, 2, 2)


def build_pyramid_blockwise(volume, levels: int, client, ledgers: Path, *, restart: bool = False,
                            progress: bool = True) -> list:
    """Add `levels` downsampled scales (labels by mode, images by mean), one shard-aligned block per task."""
    from pipeline.runner import run_blockwise
    from storage.pyramid import add_scales, downsample_block_fn

    src = volume
    created = []
    for level in range(levels):
        factor = pyramid_factor(src.voxel_size)
        (dst,) = add_scales(src, [factor])
        grid = BlockGrid(dst.bounds, dst.chunk_shape, alignment=dst.chunk_shape)
        run_blockwise(f"pyramid-{level + 1}", grid, downsample_block_fn, params=dict(src_spec=src.spec, dst_spec=dst.spec),
                      client=client, ledger_dir=ledgers, restart=restart, progress=progress)
        created.append(dst)
        src = dst
    return created


def _build_pyramid(segmentation, config: SegmentConfig, client, ledgers: Path, progress: bool) -> None:
    build_pyramid_blockwise(segmentation, config.pyramid_levels, client, ledgers, restart=config.restart,
                            progress=progress)


def _write_store(out: Path, stats: pd.DataFrame, lookup: pd.DataFrame, seg_results: dict, voxel_size_xyz) -> None:
    """segments rows (nm, XYZ) and the fragment -> segment id map, as one committed store version."""
    from storage.store import ConnectomeStore

    vx, vy, vz = (float(v) for v in voxel_size_xyz)
    n = stats["voxel_count"].to_numpy(np.float64)
    segments = pd.DataFrame({
        "segment_id": stats["segment_id"].astype(np.int64),
        "voxel_count": stats["voxel_count"].astype(np.int64),
        "bbox_min_x_nm": (stats["min_x"] * vx).astype(np.int32),
        "bbox_min_y_nm": (stats["min_y"] * vy).astype(np.int32),
        "bbox_min_z_nm": (stats["min_z"] * vz).astype(np.int32),
        "bbox_max_x_nm": (stats["max_x"] * vx).astype(np.int32),
        "bbox_max_y_nm": (stats["max_y"] * vy).astype(np.int32),
        "bbox_max_z_nm": (stats["max_z"] * vz).astype(np.int32),
        "centroid_x_nm": np.round((stats["sum_x"] / n + 0.5) * vx).astype(np.int32),
        "centroid_y_nm": np.round((stats["sum_y"] / n + 0.5) * vy).astype(np.int32),
        "centroid_z_nm": np.round((stats["sum_z"] / n + 0.5) * vz).astype(np.int32),
    })
    sizes = {}
    for r in seg_results.values():
        sizes.update(zip(r["write_ids"], r["write_sizes"]))
    id_map = pd.DataFrame({
        "fragment_id": lookup["fragment_id"].astype(np.int64),
        "segment_id": lookup["segment_id"].astype(np.int64),
        "voxel_count": [int(sizes.get(int(f), 0)) for f in lookup["fragment_id"]],
    })
    id_map = id_map[id_map["voxel_count"] > 0]
    store_path = out / "connectome.duckdb"
    store = ConnectomeStore.open(str(store_path)) if store_path.exists() else ConnectomeStore.create(str(store_path))
    with store.loading("segment") as version:
        store.write_segments(segments, version=version)
        store.write_id_map(id_map, version=version)
