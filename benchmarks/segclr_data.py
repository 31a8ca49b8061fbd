"""Synthetic volumes for SegCLR training and evaluation (pipeline.synthetic, generated tile by tile).

Why tiles: the generator pads every box by ~130 voxels in XY for context, so one 512^2 tile is the best
time/memory trade-off on a small machine; tiles are exact sub-boxes of one deterministic volume.
Why the density overrides: with the default densities axons outnumber smooth dendrites ~15:1; raising the
dendrite/glia densities gives every class enough held-out cells for the linear probes (same morphology rules).

    python benchmarks/segclr_data.py --seeds 1,2 --out /tmp/segclr_train        # zarr raw/gt for training
Training volumes go to OUT/seed<N>/{raw,gt}.zarr (+ cell_types.parquet); never commit them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DENSITY = {"axons_per_cell": 5.0, "spiny_per_cell": 1.4, "smooth_per_cell": 1.2, "glia_per_cell": 0.6}
DEFAULT_SHAPE_ZYX = (96, 512, 512)
TILE_YX = 512


def params_for(seed: int, shape_zyx=DEFAULT_SHAPE_ZYX):
    from pipeline.synthetic import SynthParams

    return SynthParams(seed=int(seed), shape_zyx=tuple(shape_zyx), **DENSITY)


def generate_whole_volume(params):
    """pipeline.synthetic.generate_block for the box that IS the whole volume, without the context padding.

    Why: the padding (~130 voxels in XY) only makes tiles agree with their neighbours; for one box covering the
    whole volume nothing lies beyond it (objects are clipped to the volume), and skipping it makes a 512^2
    volume ~3x cheaper. Only the EM blur/section shifts within a few voxels of the volume faces differ.
    This mirrors generate_block's steps; if the generator's internals change under it, it falls back to the
    public generate_block (same volume, slower).
    """
    from pipeline.synthetic import generate_block

    try:
        return _whole_volume_unpadded(params)
    except Exception as exc:  # noqa: BLE001 - internals moved: the public API still gives the same volume
        print(f"segclr_data: unpadded fast path unavailable ({exc}); using generate_block", file=sys.stderr)
        return generate_block(params, ((0, 0, 0), tuple(params.shape_zyx)))


def _whole_volume_unpadded(params):
    from pipeline.synthetic import generate as g
    from storage.box import Box

    box = Box.from_shape(params.shape_zyx)
    vs = np.array(params.voxel_size_zyx)
    lo, hi = np.array(box.start) * vs, np.array(box.stop) * vs
    node_lo, node_hi = lo - g.SYNAPSE_CONTEXT_NM, hi + g.SYNAPSE_CONTEXT_NM
    objects = g.objects_near(params, node_lo, node_hi)
    nodes = g.build_nodes(params, objects, lo, hi)
    syn_nodes = g.build_nodes(params, objects, node_lo, node_hi, spacing_nm=g.SYNAPSE_NODE_SPACING_NM)
    seg_idx, owner = g.compute_labels(nodes, params, box.start, box.shape)
    ids = np.concatenate([np.zeros(1, np.uint64), nodes.seg_ids])
    labels = ids[seg_idx.astype(np.int64) + 1]
    lonely = g.isolated_voxels(labels)
    labels[lonely] = 0
    owner[lonely] = -1
    comp = np.zeros(labels.shape, np.uint8)
    if len(nodes.comp):
        comp = np.where(owner >= 0, nodes.comp[np.maximum(owner, 0)], 0).astype(np.uint8)
    boutons = g.boutons_in(nodes, lo - g.BOUTON_MARGIN_NM, hi + g.BOUTON_MARGIN_NM)
    synapses = g.find_synapses(params, syn_nodes, boutons)
    ves_pos, ves_host = g.vesicles(params, nodes, boutons, synapses)
    mitos = []
    for oi, obj in enumerate(objects):
        if not obj.mitos:
            continue
        ctrl = np.concatenate([c.points for c in obj.chains])
        ctrl_seg = nodes.ctrl_seg[oi][0][:len(ctrl)]
        for p0, p1, mr in obj.mitos:
            c = (p0 + p1) / 2
            if np.any(c < lo - 1000.0) or np.any(c > hi + 1000.0):
                continue
            host = ctrl_seg[np.argmin(np.linalg.norm(ctrl - c, axis=1))]
            if host >= 0:
                mitos.append((p0, p1, mr, nodes.seg_ids[host]))
    raw, clefts = g.render(params, box.start, box.shape, labels, mitos, ves_pos, ves_host, synapses)
    volumes = {"raw": raw, "gt": labels, "compartments": comp, "clefts": clefts}
    return g.SynthBlock(volumes, g._synapse_rows(params, synapses, box), g._segment_rows(nodes, labels))


def tiles(shape_zyx, tile_yx=TILE_YX):
    from storage.box import Box, BlockGrid

    return list(BlockGrid(Box.from_shape(shape_zyx), (shape_zyx[0], tile_yx, tile_yx)))


def generate_downsampled(seed: int, shape_zyx, downsample, log=print):
    """-> (em_ds uint8, seg_ds uint64, comp_ds uint8, cell_types DataFrame, voxel_size_xyz_nm) at model scale."""
    import pandas as pd

    from pipeline.synthetic import generate_block, merge_tables
    from segclr.cutouts import downsample_em, downsample_seg

    params = params_for(seed, shape_zyx)
    f = tuple(int(d) for d in downsample)
    out_shape = tuple(s // k for s, k in zip(shape_zyx, f))
    em = np.zeros(out_shape, np.uint8)
    seg = np.zeros(out_shape, np.uint64)
    comp = np.zeros(out_shape, np.uint8)
    rows = []
    for b in tiles(shape_zyx):
        t0 = time.time()
        blk = generate_whole_volume(params) if b.write.shape == tuple(shape_zyx) else generate_block(params, b.write)
        dst = tuple(slice(a // k, e // k) for a, e, k in zip(b.write.start, b.write.stop, f))
        em[dst] = downsample_em(blk.volumes["raw"], f)
        seg[dst] = downsample_seg(blk.volumes["gt"], f)
        comp[dst] = downsample_seg(blk.volumes["compartments"], f)
        rows.append((blk.synapses, blk.segments))
        log(f"seed {seed} tile {b.block_id + 1}: {time.time() - t0:.0f} s")
    _, types = merge_tables(rows)
    return em, seg, comp, pd.DataFrame(types), tuple(params.voxel_size_xyz_nm)


def write_training_volume(seed: int, out_dir: str | Path, shape_zyx=DEFAULT_SHAPE_ZYX, log=print) -> Path:
    """Scale-0 raw + gt zarr volumes (and the cell-type table) of one synthetic volume."""
    from pipeline.synthetic import generate_block, merge_tables
    from storage.volume import create_volume

    params = params_for(seed, shape_zyx)
    d = Path(out_dir) / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    kw = dict(shape_zyx=shape_zyx, voxel_size_xyz_nm=params.voxel_size_xyz_nm, chunk_shape_zyx=(32, 256, 256),
              delete_existing=True)
    raw = create_volume(str(d / "raw.zarr"), dtype=np.uint8, kind="image", **kw)
    gt = create_volume(str(d / "gt.zarr"), dtype=np.uint64, kind="segmentation", **kw)
    rows = []
    for b in tiles(shape_zyx):
        t0 = time.time()
        blk = generate_whole_volume(params) if b.write.shape == tuple(shape_zyx) else generate_block(params, b.write)
        raw.write(b.write, blk.volumes["raw"])
        gt.write(b.write, blk.volumes["gt"])
        rows.append((blk.synapses, blk.segments))
        log(f"seed {seed} tile {b.block_id + 1}: {time.time() - t0:.0f} s")
    _, types = merge_tables(rows)
    types.to_parquet(d / "cell_types.parquet", index=False)
    (d / "DONE").write_text("ok\n")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write synthetic training volumes for SegCLR")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape-xyz", default=",".join(map(str, DEFAULT_SHAPE_ZYX[::-1])))
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape_xyz.split(","))[::-1]
    for s in args.seeds.split(","):
        print(write_training_volume(int(s), args.out, shape), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
