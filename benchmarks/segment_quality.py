"""Quality of the whole-volume (blockwise) segmentation next to the one-block run and the classical baseline.

For each held-out volume the driver (`run_segmentation`, real LocalCluster, real TensorStore) segments it twice:
as 2x2x2 blocks with the configured overlap, and as one block. Each run is made with agglomeration on; the run
directory keeps the fragments, the reconciled table (agglomeration off) and the final table (agglomeration on),
so both results come from the same FFN pass (relabel only applies a table). Next to them: the watershed baseline
(pipeline/baseline.py) with its parameters chosen on training data of the same kind.

Held-out data: synthetic seeds 11 and 12 (the small model trains on other seeds), and the medulla validation
sections z 120-169 of ../shared/data/flyem_fib_medulla_train (a medulla model trained on z 0-119).
Training data (baseline parameters, `--tune`): synthetic seed 3, medulla z 60-109.

`--tune` also sweeps the agglomeration rule on the training volumes (from the run's saved edge table, no
re-segmentation) and prints the VOI for each setting; each packaged FFN model records the rule chosen there
and whether it is on by default (`metadata.agglomeration` in its config.json, read by `rule_for_model`): on only
when the chosen rule also improves the held-out volumes' blockwise VOI.

    python benchmarks/segment_quality.py [--model synthetic_small] [--medulla-model medulla_small] [--xy 128] [--tune]

Target (issue 4): blockwise VOI within 5 % of the one-block VOI. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.baseline import best_baseline, watershed_baseline  # noqa: E402
from pipeline.cluster import ClusterConfig, open_client  # noqa: E402
from pipeline.metrics import evaluate  # noqa: E402
from pipeline.segmentation import SegmentConfig, run_segmentation  # noqa: E402
from ffn.model import load_config  # noqa: E402
from pipeline.stages.agglomerate import (AgglomerationParams, agglomerated_lookup, merge_decisions,  # noqa: E402
                                         rule_for_model)
from pipeline.stages.relabel import apply_lookup  # noqa: E402
from storage.box import Box  # noqa: E402
from storage.volume import create_volume, open_volume  # noqa: E402

MEDULLA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flyem_fib_medulla_train" / "medulla_train.h5"
SYNTH_SHAPE = (32, 128, 128)


def synthetic(seed: int, shape=SYNTH_SHAPE):
    from pipeline.synthetic import SynthParams, generate_box

    params = SynthParams(seed=seed, shape_zyx=shape)
    arrays = generate_box(params, Box.from_shape(shape))
    return arrays["raw"], arrays["gt"], tuple(params.voxel_size_xyz_nm)


def medulla(z0: int, z1: int, xy: int):
    import h5py

    with h5py.File(MEDULLA, "r") as f:
        return f["raw"][z0:z1, :xy, :xy], f["gt"][z0:z1, :xy, :xy], (10.0, 10.0, 10.0)


def one_block_shape(shape, chunk) -> tuple[int, int, int]:
    """Smallest chunk * 2^k covering the volume per axis (the driver wants blocks = chunks times a power of 2)."""
    out = []
    for s, c in zip(shape, chunk):
        b = c
        while b < s:
            b *= 2
        out.append(b)
    return tuple(out)


def read_results(out: Path, shape) -> dict[str, np.ndarray]:
    """Agglomeration off (reconcile table) and on (final table), applied to the same fragments."""
    frags = open_volume(f"precomputed://{out / 'fragments'}").read(Box.from_shape(shape))
    res = {}
    for name, table in (("off", "reconcile.parquet"), ("on", "lookup.parquet")):
        t = pq.read_table(out / table).to_pandas()
        order = np.argsort(t["fragment_id"].to_numpy(np.uint64))
        res[name] = apply_lookup(frags, t["fragment_id"].to_numpy(np.uint64)[order],
                                 t["segment_id"].to_numpy(np.uint64)[order])
    return res


def segment(client, root: Path, name: str, raw, voxel_size, model: str, block, overlap, chunk, agglomeration):
    url = root / "raw.zarr"
    if not url.exists():
        vol = create_volume(str(url), shape_zyx=raw.shape, dtype="uint8", voxel_size_xyz_nm=voxel_size,
                            chunk_shape_zyx=tuple(min(c, s) for c, s in zip(chunk, raw.shape)))
        vol.write(vol.bounds, raw)
    config = SegmentConfig(input=str(url), output=str(root / name), model=model, block_shape=tuple(block),
                           overlap=tuple(overlap), chunk_shape=tuple(chunk), agglomerate=True,
                           agglomeration=agglomeration, pyramid_levels=0)
    t0 = time.perf_counter()
    summary = run_segmentation(config, client, progress=False)
    return read_results(root / name, raw.shape), time.perf_counter() - t0, summary


def scores(seg, gt) -> dict:
    s = evaluate(seg, gt)
    return {"voi": round(s.voi, 4), "voi_split": round(s.voi_split, 4), "voi_merge": round(s.voi_merge, 4),
            "arand": round(s.arand, 4), "segments": s.segments, "labelled": round(float(np.mean(seg > 0)), 3)}


def sweep(out: Path, shape, gt, grid) -> list[dict]:
    """VOI for each agglomeration setting, from the run's saved edges (no re-segmentation)."""
    frags = open_volume(f"precomputed://{out / 'fragments'}").read(Box.from_shape(shape))
    rec = pq.read_table(out / "reconcile.parquet").to_pandas()
    edges_path = out / "agglomeration_edges.parquet"
    edges = pq.read_table(edges_path).to_pandas() if edges_path.exists() else pd.DataFrame()
    order = np.argsort(rec["fragment_id"].to_numpy(np.uint64))
    frag_ids = rec["fragment_id"].to_numpy(np.uint64)[order]
    rows = [{"params": "agglomeration off", "merges": 0,
             **scores(apply_lookup(frags, frag_ids, rec["segment_id"].to_numpy(np.uint64)[order]), gt)}]
    for params in grid:
        decisions = merge_decisions(edges, params) if len(edges) else pd.DataFrame(columns=["a", "b"])
        lut = agglomerated_lookup(rec, decisions)
        seg = apply_lookup(frags, frag_ids, lut["segment_id"].to_numpy(np.uint64)[order])
        rows.append({"params": {k: v for k, v in params.__dict__.items()}, "merges": len(decisions),
                     **scores(seg, gt)})
    return rows


def tune_grid(base: AgglomerationParams) -> list[AgglomerationParams]:
    grid = [replace(base, min_ratio=r, min_contact=c) for r in (0.85, 0.9, 0.95, 1.0, 1.05, 1.1)
            for c in (30, 100, 300)]
    grid += [replace(base, min_ratio=None, min_intensity=i, min_contact=30) for i in (120.0, 140.0, 150.0, 160.0)]
    return grid


def evaluate_dataset(client, tmp: Path, name: str, raw, gt, voxel_size, train, model, block, overlap, chunk,
                     agglomeration, tune: bool) -> dict:
    root = tmp / name
    root.mkdir()
    t0 = time.perf_counter()
    bparams, _, _ = best_baseline(train[0], train[1], train[2])
    base = scores(watershed_baseline(raw, voxel_size, bparams), gt)
    base["params"] = bparams.to_json()
    t_base = time.perf_counter() - t0
    many, t_many, s_many = segment(client, root, "blockwise", raw, voxel_size, model, block, overlap, chunk,
                                   agglomeration)
    one, t_one, s_one = segment(client, root, "one_block", raw, voxel_size, model,
                                one_block_shape(raw.shape, chunk), overlap, chunk, agglomeration)
    row = {
        "shape_zyx": list(raw.shape), "block_zyx": list(block), "overlap_zyx": list(overlap),
        "baseline": base,
        "blockwise_agglomeration_off": scores(many["off"], gt), "blockwise_agglomeration_on": scores(many["on"], gt),
        "one_block_agglomeration_off": scores(one["off"], gt), "one_block_agglomeration_on": scores(one["on"], gt),
        "blockwise_vs_one_block": {k: round(evaluate(many[k], one[k]).voi, 4) for k in ("off", "on")},
        "seconds": {"baseline": round(t_base, 1), "blockwise": round(t_many, 1), "one_block": round(t_one, 1)},
        "merges": {"blockwise": s_many["merges"], "one_block": s_one["merges"]},
        "agglomeration": {**s_many["agglomeration"],
                          "on_by_default": rule_for_model(load_config(model).metadata).enabled},
    }
    if tune:
        train_root = tmp / f"{name}_train"
        train_root.mkdir()
        _, _, _ = segment(client, train_root, "blockwise", train[0], train[2], model, block, overlap, chunk,
                          agglomeration)
        row["tuning_on_training_data"] = sweep(train_root / "blockwise", train[0].shape, train[1],
                                               tune_grid(AgglomerationParams()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic_small", help="FFN model for the synthetic volumes")
    parser.add_argument("--medulla-model", default="medulla_small",
                        help="FFN model for the medulla sections (`medulla` is better and ~12x slower)")
    parser.add_argument("--xy", type=int, default=128, help="medulla crop in y and x (full: 250)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[11, 12], help="held-out synthetic seeds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tune", action="store_true", help="also sweep agglomeration settings on training data")
    parser.add_argument("--skip", nargs="*", default=[], help="datasets to skip: synthetic, medulla")
    args = parser.parse_args()
    from ffn.model import resolve_model

    agglomeration = None  # each model's own rule (pipeline.stages.agglomerate.rule_for_model)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, \
            open_client(ClusterConfig(workers=args.workers, threads_per_worker=1, dashboard=False)) as client:
        tmp = Path(tmp)
        if "synthetic" not in args.skip:
            model = str(resolve_model(args.model))
            train = synthetic(3)
            for seed in args.seeds:
                raw, gt, vs = synthetic(seed)
                results[f"synthetic_seed{seed}"] = evaluate_dataset(
                    client, tmp, f"synthetic{seed}", raw, gt, vs, train, model, (16, 64, 64), (8, 16, 16),
                    (16, 32, 32), agglomeration, args.tune and seed == args.seeds[0])
                print(json.dumps({f"synthetic_seed{seed}": results[f"synthetic_seed{seed}"]}), file=sys.stderr)
        if "medulla" not in args.skip:
            if not MEDULLA.exists():
                print(f"skipping medulla: {MEDULLA} not found", file=sys.stderr)
            else:
                model = str(resolve_model(args.medulla_model))
                raw, gt, vs = medulla(120, 170, args.xy)
                train = medulla(60, 110, args.xy)
                results["medulla_z120_169"] = evaluate_dataset(
                    client, tmp, "medulla", raw, gt, vs, train, model, (32, 64, 64), (16, 16, 16), (16, 32, 32),
                    agglomeration, args.tune)
                print(json.dumps({"medulla_z120_169": results["medulla_z120_169"]}), file=sys.stderr)

    print(f"{'dataset':<20} {'method':<28} {'VOI':>7} {'split':>7} {'merge':>7} {'ARAND':>7}")
    summary = {}
    for ds, row in results.items():
        for method in ("baseline", "one_block_agglomeration_off", "one_block_agglomeration_on",
                       "blockwise_agglomeration_off", "blockwise_agglomeration_on"):
            s = row[method]
            print(f"{ds:<20} {method:<28} {s['voi']:7.3f} {s['voi_split']:7.3f} {s['voi_merge']:7.3f} {s['arand']:7.3f}")
        default = "on" if row["agglomeration"]["on_by_default"] else "off"  # as the model records it
        one = row[f"one_block_agglomeration_{default}"]["voi"]
        many = row[f"blockwise_agglomeration_{default}"]["voi"]
        summary[ds] = {
            "blockwise_voi": many, "one_block_voi": one, "baseline_voi": row["baseline"]["voi"],
            "blockwise_over_one_block": round(many / one, 4) if one else None,
            "agglomeration_voi_change": round(row["blockwise_agglomeration_on"]["voi"]
                                              - row["blockwise_agglomeration_off"]["voi"], 4),
            "blockwise_arand": row[f"blockwise_agglomeration_{default}"]["arand"],
            "baseline_arand": row["baseline"]["arand"],
            "agglomeration": row["agglomeration"],
        }
    ratios = [v["blockwise_over_one_block"] for v in summary.values() if v["blockwise_over_one_block"]]
    out = {"datasets": summary,
           "max_blockwise_over_one_block": max(ratios) if ratios else None, "details": results}
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
