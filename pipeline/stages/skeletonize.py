"""skeletonize: kimimaro per block (read box = write box + 1 voxel at the far faces), merged per segment.

The block function writes its pieces to ``<work_dir>/skeleton_pieces/block_<id>.npz`` (atomically) and returns
counts; the driver merges pieces per segment (segclr.skeletons.merge_skeletons), writes
``<work_dir>/skeletons.parquet`` (the store's skeleton_nodes columns; the embed stage reads it) and, when a store
is given, the ``skeleton_nodes`` rows.

Given the pre-agglomeration fragments, every node also records the fragment under it (``fragment_id``), read by
the block that made the node: a proofreading split then hands each node, and its embedding, to the part that
holds its fragment, in the store alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from segclr.skeletons import Skeleton, block_read_box, merge_skeletons, skeletonize_region, skeletons_to_table
from storage.box import Block, Box, BlockGrid
from storage.volume import open_volume

PIECES = "skeleton_pieces"
SKELETONS_FILE = "skeletons.parquet"


def skeletonize_block(block: Block, *, seg_spec: dict, bounds: dict, work_dir: str, dust_threshold: int,
                      teasar_params: dict | None, fragments_spec: dict | None = None) -> dict:
    seg = open_volume(seg_spec)
    rb = block_read_box(block.write, Box.from_json(bounds))
    skels = skeletonize_region(seg.read(rb), rb.start, seg.voxel_size, dust_threshold=dust_threshold,
                               teasar_params=teasar_params)
    frags = open_volume(fragments_spec).read(rb) if fragments_spec and skels else None
    arrays = {}
    for sid, sk in skels.items():
        arrays[f"{sid}_v"], arrays[f"{sid}_e"], arrays[f"{sid}_r"] = sk.vertices, sk.edges, sk.radii
        if frags is not None:
            arrays[f"{sid}_f"] = fragments_at(frags, rb, sk.vertices, seg.voxel_size)
    out = Path(work_dir) / PIECES
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"block_{block.block_id}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out / f"block_{block.block_id}.npz")
    return {"segments": len(skels), "vertices": int(sum(len(s) for s in skels.values()))}


def fragments_at(fragments: np.ndarray, box: Box, vertices_nm: np.ndarray, voxel_size_xyz) -> np.ndarray:
    """The fragment id under each vertex (vertices in volume nm, XYZ, at voxel positions; ``fragments`` = box)."""
    idx = np.rint(np.asarray(vertices_nm)[:, ::-1] / np.asarray(voxel_size_xyz, np.float64)[::-1]).astype(np.int64)
    idx = np.clip(idx - np.asarray(box.start), 0, np.asarray(box.shape) - 1)
    return fragments[tuple(idx.T)].astype(np.int64)


NODE_KEY = ["segment_id", "x_nm", "y_nm", "z_nm"]


def merge_pieces(work_dir: str | Path, join_radius_nm: float) -> tuple[dict[int, Skeleton], pd.DataFrame]:
    """{segment: merged skeleton} and the blocks' node fragments (columns NODE_KEY + fragment_id, positions as
    ``skeletons_to_table`` rounds them: a vertex two blocks share has the same key in both)."""
    pieces: dict[int, list[Skeleton]] = {}
    fragments = []
    for path in sorted((Path(work_dir) / PIECES).glob("block_*.npz"), key=lambda p: p.name):
        if ".tmp" in path.name:
            continue
        with np.load(path) as z:
            for sid in sorted({k.rsplit("_", 1)[0] for k in z.files}, key=int):
                v = z[f"{sid}_v"]
                pieces.setdefault(int(sid), []).append(Skeleton(v, z[f"{sid}_e"], z[f"{sid}_r"]))
                if f"{sid}_f" in z.files:
                    xyz = np.rint(v).astype(np.int32)
                    fragments.append(pd.DataFrame({"segment_id": np.int64(sid), "x_nm": xyz[:, 0], "y_nm": xyz[:, 1],
                                                   "z_nm": xyz[:, 2], "fragment_id": z[f"{sid}_f"]}))
    merged = {sid: merge_skeletons(p, join_radius_nm=join_radius_nm) for sid, p in sorted(pieces.items())}
    frag = pd.concat(fragments, ignore_index=True).drop_duplicates(NODE_KEY) if fragments else None
    return merged, frag


def run_skeletonize(seg_url: str, work_dir: str | Path, *, client, block_shape_zyx=(128, 128, 128),
                    dust_threshold: int = 200, teasar_params: dict | None = None, join_radius_nm: float | None = None,
                    store=None, restart: bool = False, progress: bool = True,
                    fragments_url: str | None = None) -> pd.DataFrame:
    """Skeletonize every segment of ``seg_url`` blockwise; returns the skeleton_nodes table (also saved), with
    each node's ``fragment_id`` when ``fragments_url`` (the pre-agglomeration fragments) is given."""
    from pipeline.runner import run_blockwise

    seg = open_volume(seg_url)
    work_dir = Path(work_dir)
    align = seg.chunk_shape
    block_shape = tuple(max(a, b // a * a) for b, a in zip(block_shape_zyx, align))
    grid = BlockGrid(seg.bounds, block_shape, alignment=align)
    run_blockwise("skeletonize", grid, skeletonize_block, client=client, ledger_dir=work_dir / "ledger",
                  params={"seg_spec": seg.spec, "bounds": seg.bounds.to_json(), "work_dir": str(work_dir),
                          "dust_threshold": int(dust_threshold), "teasar_params": teasar_params,
                          "fragments_spec": open_volume(fragments_url).spec if fragments_url else None},
                  restart=restart, progress=progress)
    if join_radius_nm is None:
        join_radius_nm = 2.0 * float(max(seg.voxel_size))
    skeletons, fragments = merge_pieces(work_dir, join_radius_nm)
    table = skeletons_to_table(skeletons)
    if fragments is not None and len(table):
        table = table.merge(fragments, on=NODE_KEY, how="left", validate="many_to_one")
        table["fragment_id"] = table["fragment_id"].astype("Int64")
    tmp = work_dir / (SKELETONS_FILE + ".tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, work_dir / SKELETONS_FILE)
    if store is not None:
        with store.loading("skeletonize") as v:
            store.write_skeleton_nodes(table, version=v)
    return table
