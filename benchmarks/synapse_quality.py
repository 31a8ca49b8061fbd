"""Synapse detection quality: precision, recall, F1 of clefts (one-to-one matching by distance, CREMI-style) on
held-out synthetic volumes and on ISBI 2012 test sections 24-29, and partner (pre, post) accuracy on synthetic.

Partners are assigned from the ground-truth segmentation here, so the figure isolates the detector and its
polarity channels from segmentation errors (the demo's summary reports the end-to-end figure on FFN output).
ISBI has cleft masks only: its clefts are the 3D connected components of the masks after the same 2x in-plane
downsampling the model was trained with (8 x 8 x 50 nm). The candidate filter (pipeline/synapse_filter.py) needs
partner segments, which ISBI lacks, so ISBI scores the detector's candidates unfiltered; `--no-filter` does the same
on synthetic to show what the filter adds.

    python benchmarks/synapse_quality.py [--model synapses_small] [--seeds 201 ... 224] [--shape 48 192 192]
        [--no-filter] [--flips 1|4|8|16]

The default held-out set is 24 volumes (368 synapses, about 13 minutes on 2 cores): with 4 volumes (69 synapses)
one synapse moved F1 by 0.007, more than the differences being measured (see
pipeline/models/synapses_small/TRAINING.md, stop 19).

Last line: {"synthetic": {"precision", "recall", "f1", "partner_accuracy"}, "isbi": {"precision", "recall", "f1"}}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# ISBI truth: cleft-mask components of at least this many voxels (fixed, so the truth set does not move when the
# detector's own min_size is tuned)
ISBI_MIN_CLEFT_VOXELS = 20


def synthetic_scores(model_dir, seeds, shape, params, distance_nm: float) -> dict:
    from pipeline.stages.synapses import detect_image, synapses_from_candidates
    from pipeline.synapse_metrics import detection_scores
    from pipeline.synapse_model import load_model
    from pipeline.synthetic import SynthParams, generate_block
    from storage.box import Box

    model, config = load_model(model_dir)
    preds, trues = [], []
    offset = 0
    for seed in seeds:
        sp = SynthParams(seed=seed, shape_zyx=tuple(shape))
        block = generate_block(sp, Box.from_shape(tuple(shape)))
        df = detect_image(model, config, block.volumes["raw"], block.volumes["gt"], sp.voxel_size_zyx, params)
        table = synapses_from_candidates(df, model_dir, params, sp.voxel_size_xyz_nm)
        table = table[table["valid"]] if len(table) else table
        # keep volumes apart in space so matching never crosses volumes
        for t in (table, block.synapses):
            t["x_nm"] = t["x_nm"].astype(float) + offset
        offset += 1e7
        preds.append(table)
        trues.append(block.synapses)
    pred = pd.concat(preds, ignore_index=True)
    true = pd.concat(trues, ignore_index=True)
    true = true.astype({"pre_segment_id": np.int64, "post_segment_id": np.int64})
    s = detection_scores(pred, true, distance_nm)
    return {k: s[k] for k in ("precision", "recall", "f1", "partner_accuracy", "predicted", "true") if k in s}


def isbi_scores(model, config, params, distance_nm: float) -> dict:
    import cc3d

    from pipeline.stages.synapses import detect
    from pipeline.synapse_metrics import detection_scores
    from pipeline.synapse_model import predict
    from pipeline.synapse_training import isbi_stack

    raw, cleft = isbi_stack(SHARED / "isbi2012_vnc_sstem", range(24, 30))
    voxel = (50.0, 8.0, 8.0)
    probs = predict(model, config, raw, params.flips)
    df = detect(probs, np.zeros(raw.shape, np.uint64), voxel, params)
    pred = pd.DataFrame({"x_nm": df["x"] * 8.0, "y_nm": df["y"] * 8.0, "z_nm": df["z"] * 50.0}) if len(df) else \
        pd.DataFrame({"x_nm": [], "y_nm": [], "z_nm": []})
    labels = cc3d.connected_components(cleft.astype(bool), connectivity=26)
    stats = cc3d.statistics(labels)
    cent = np.asarray(stats["centroids"])[1:]
    sizes = np.asarray(stats["voxel_counts"])[1:]
    cent = cent[sizes >= ISBI_MIN_CLEFT_VOXELS]
    true = pd.DataFrame({"x_nm": cent[:, 2] * 8.0, "y_nm": cent[:, 1] * 8.0, "z_nm": cent[:, 0] * 50.0})
    s = detection_scores(pred, true, distance_nm)
    return {k: s[k] for k in ("precision", "recall", "f1", "predicted", "true")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synapses_small")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(201, 225)))
    ap.add_argument("--shape", nargs=3, type=int, default=[48, 192, 192])
    ap.add_argument("--threshold", type=float, default=None, help="cleft threshold (default: DetectionParams)")
    ap.add_argument("--no-filter", action="store_true", help="keep every candidate (skip the model's candidate "
                    "filter) to see what the filter adds")
    ap.add_argument("--flips", type=int, default=None, help="symmetries the maps are averaged over (default: "
                    "DetectionParams; 1 = a single view)")
    ap.add_argument("--distance-nm", type=float, default=200.0, help="matching distance (CREMI-style)")
    ap.add_argument("--isbi-distance-nm", type=float, default=300.0)
    args = ap.parse_args()

    from pipeline.stages.synapses import DetectionParams
    from pipeline.synapse_filter import load_filter
    from pipeline.synapse_model import load_model, resolve_model

    model_dir = resolve_model(args.model)
    overrides = {k: v for k, v in (("threshold", args.threshold), ("flips", args.flips)) if v is not None}
    params = DetectionParams(candidate_filter=not args.no_filter, **overrides)
    result = {"model": args.model, "flips": params.flips, "threshold": params.threshold,
              "candidate_filter": params.candidate_filter and load_filter(model_dir) is not None,
              "synthetic": synthetic_scores(model_dir, args.seeds, args.shape, params, args.distance_nm)}
    if (SHARED / "isbi2012_vnc_sstem").is_dir():
        result["isbi"] = isbi_scores(*load_model(model_dir), params, args.isbi_distance_nm)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
