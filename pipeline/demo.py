"""`connectome demo`: synthetic EM -> every stage -> store -> summary scored against ground truth -> viewer.

The demo is the product in miniature: the same `run_pipeline` a lab runs on Slurm, on a volume generated here
with known answers, so the summary can say how good each stage is (VOI/ARAND of the segmentation, synapse F1,
cell-type accuracy), not only that it ran.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.run import RunConfig, run_pipeline

# the demo's default stage settings, sized for a 2-core machine
DEMO_BLOCK = (64, 128, 128)


def demo_config(raw_url: str, out: Path, gpu: bool = False) -> RunConfig:
    config = RunConfig(input=raw_url, output=str(out / "run"), gpu=gpu)
    config.segment.block_shape = DEMO_BLOCK
    config.synapses.block_shape = DEMO_BLOCK
    config.skeletonize.block_shape = DEMO_BLOCK
    return config


def training_segments(truth: pd.DataFrame) -> set[int]:
    """The classifier-training half of the labelled segments; the rest are scored in the summary.

    Stratified by cell type (every other segment of each type, in md5 order of the id, the first to training), so
    both halves hold every type that has two segments: with a plain hash split a small run whose segments are
    mostly axons can leave the training half with one class, and the classifier cannot be trained."""
    import hashlib

    def key(segment_id) -> bytes:
        return hashlib.md5(str(int(segment_id)).encode()).digest()

    train: set[int] = set()
    for _, ids in truth.groupby("cell_type")["segment_id"]:
        train.update(int(x) for x in sorted(ids, key=key)[::2])
    return train


def ground_truth_types(synth_dir: Path, run_dir: Path, id_map: dict[int, int] | None = None) -> pd.DataFrame:
    """segment_id, cell_type of each predicted segment: the type of the ground-truth cell it overlaps most.

    ``id_map`` (predicted -> ground-truth id, as ``overlap_id_map``) saves reading both volumes again when the
    caller has it."""
    if id_map is None:
        from pipeline.synapse_metrics import overlap_id_map
        from storage.volume import open_volume

        gt_vol = open_volume(str(synth_dir / "gt"))
        seg_vol = open_volume(f"precomputed://{run_dir / 'segmentation'}")
        id_map = overlap_id_map(seg_vol.read(seg_vol.bounds), gt_vol.read(gt_vol.bounds))
    truth = pd.read_parquet(synth_dir / "cell_types.parquet")
    type_of = dict(zip(truth["segment_id"].astype(np.uint64), truth["cell_type"]))
    rows = [(s, type_of.get(np.uint64(g))) for s, g in id_map.items()]
    return pd.DataFrame([r for r in rows if r[1] is not None], columns=["segment_id", "cell_type"])


def write_training_labels(synth_dir: Path, run_dir: Path) -> Path:
    """Labels for the classifier-training half of the segments (the other half is scored in the summary)."""
    labels = ground_truth_types(synth_dir, run_dir)
    labels = labels[labels["segment_id"].astype(int).isin(training_segments(labels))]
    path = run_dir / "work" / "demo_training_labels.csv"
    labels.to_csv(path, index=False)
    return path


def score_run(synth_dir: Path, run_dir: Path) -> dict:
    """Segmentation, synapse and classification quality of a run against the synthetic ground truth."""
    from pipeline.metrics import evaluate
    from pipeline.synapse_metrics import detection_scores, overlap_id_map
    from storage.volume import open_volume

    gt_vol = open_volume(str(synth_dir / "gt"))
    gt = gt_vol.read(gt_vol.bounds)
    seg_vol = open_volume(f"precomputed://{run_dir / 'segmentation'}")
    seg = seg_vol.read(seg_vol.bounds)
    scores = evaluate(seg, gt)
    out = {"voi": round(scores.voi, 4), "voi_split": round(scores.voi_split, 4),
           "voi_merge": round(scores.voi_merge, 4), "arand": round(scores.arand, 4),
           "segments": int(len(np.unique(seg)) - (0 in seg)), "gt_segments": int(scores.gt_segments)}
    id_map = overlap_id_map(seg, gt)
    synapses_file = run_dir / "work" / "synapses.parquet"
    if synapses_file.exists():
        pred = pd.read_parquet(synapses_file)
        pred = pred[pred["valid"]] if len(pred) else pred
        true = pd.read_parquet(synth_dir / "synapses.parquet")
        s = detection_scores(pred, true, max_distance_nm=200.0, id_map=id_map)
        out["synapse_f1"] = s["f1"]
        out["synapse_precision"] = s["precision"]
        out["synapse_recall"] = s["recall"]
        out["synapse_partner_accuracy"] = s.get("partner_accuracy")
        out["synapses"] = int(len(pred))
    cell_types_file = run_dir / "work" / "skeletons" / "cell_types.parquet"
    if cell_types_file.exists():
        pred = pd.read_parquet(cell_types_file)
        truth = ground_truth_types(synth_dir, run_dir, id_map)
        true_of = dict(zip(truth["segment_id"].astype(int), truth["cell_type"]))
        train = training_segments(truth)
        held_out = [(p, true_of.get(int(s))) for s, p in zip(pred["segment_id"], pred["cell_type"])
                    if int(s) not in train]
        ok = [p == t for p, t in held_out if t is not None]
        out["cell_type_accuracy"] = round(float(np.mean(ok)), 4) if ok else None
        out["cell_type_scored_segments"] = len(ok)
        out["cell_type_counts"] = pred["cell_type"].value_counts().sort_index().to_dict()
    return out


def run_demo(out: Path, *, size=(128, 256, 256), seed: int = 0, client, progress: bool = True, log=print) -> dict:
    from pipeline.synthetic import SynthParams
    from pipeline.synthetic.write import write_synthetic

    out = Path(out)
    times = {}
    t0 = time.perf_counter()
    synth_dir = out / "synth"
    if not (synth_dir / "synth.json").exists():
        log(f"[synth] generating {tuple(size)} (zyx) synthetic EM with ground truth in {synth_dir}")
        write_synthetic(synth_dir, SynthParams(seed=seed, shape_zyx=tuple(size)), client=client, progress=progress)
    times["synth"] = round(time.perf_counter() - t0, 2)
    config = demo_config(str(synth_dir / "raw"), out)
    # everything up to the embeddings, then labels for half of the segments from the ground truth, so the
    # cell-type classifier is trained on this run and scored on the other half
    config.stages = ["segment", "synapses", "skeletonize", "embed"]
    run_pipeline(config, client, progress=progress, log=log)
    config.classify.labels_csv = str(write_training_labels(synth_dir, out / "run"))
    config.stages = ["segment", "synapses", "skeletonize", "embed", "classify", "publish"]
    stages = run_pipeline(config, client, progress=progress, log=log)
    times.update({name: s.get("seconds") for name, s in stages.items()})
    summary = score_run(synth_dir, out / "run")
    summary["seconds"] = times
    summary["total_seconds"] = round(time.perf_counter() - t0, 2)
    summary["run"] = str(out / "run")
    return summary


def format_summary(s: dict) -> str:
    lines = [f"run: {s['run']}",
             f"segments: {s['segments']} (ground truth {s['gt_segments']}); VOI {s['voi']:.3f} "
             f"(split {s['voi_split']:.3f}, merge {s['voi_merge']:.3f}), ARAND {s['arand']:.3f}"]
    if "synapse_f1" in s:
        lines.append(f"synapses: {s['synapses']} valid; F1 {s['synapse_f1']:.3f} (precision {s['synapse_precision']:.3f}, "
                     f"recall {s['synapse_recall']:.3f}), partner accuracy {s['synapse_partner_accuracy']}")
    if "cell_type_counts" in s:
        counts = ", ".join(f"{k} {v}" for k, v in s["cell_type_counts"].items())
        lines.append(f"cell types: {counts}; accuracy {s['cell_type_accuracy']}")
    lines.append("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    lines.append(f"total: {s['total_seconds']:.0f} s")
    return "\n".join(lines)


def summary_json(s: dict) -> str:
    return json.dumps(s, default=str)
