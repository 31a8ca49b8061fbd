"""FFN segmentation quality: our trained FFNs vs the imported FIB-25 model vs a classical watershed baseline.

What it compares, in one run, on the same voxels:
- ``medulla_val``: fly medulla FIB-SEM (../shared/data/flyem_fib_medulla_train), validation sections z 120-169
  (our medulla FFN was trained on z 0-119 only);
- ``synthetic``: a held-out synthetic volume (``pipeline.synthetic``, a seed the synthetic FFN never saw).
For each: our FFN (``--medulla-model`` / ``--synthetic-model``), the published FIB-25 FFN imported from its
google/ffn checkpoint, and the baseline of ``pipeline.baseline`` (smoothed-intensity watershed, the best h of
several chosen on training data: medulla z 0-119 / a synthetic volume with the training seed). Scores from
``pipeline.metrics``: VOI split/merge (bits, lower is better), adapted Rand error, segment counts.

Usage: python benchmarks/ffn_quality.py [--xy 250] [--synthetic-shape 48,160,160] [--skip-fib25] [--threads 2]
Last stdout line: {"medulla_val": {"ffn": {"voi", "voi_split", "voi_merge", "arand", "segments"}, "fib25": {...},
"baseline": {...}}, "synthetic": {same}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(os.environ.get("CONNECTOME_SHARED_DATA", REPO.parent / "shared" / "data"))
CKPT = SHARED / "ffn_fib25_checkpoint" / "model.ckpt-27465036"
MEDULLA = SHARED / "flyem_fib_medulla_train" / "medulla_train.h5"
TRAIN_Z, VAL_Z = (0, 120), (120, 170)
SYNTH_TRAIN_SEED, SYNTH_TEST_SEED = 1, 1001  # the synthetic FFN was trained on seed 1 (see its TRAINING.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--medulla-model", default="medulla", help="packaged name or model folder")
    p.add_argument("--synthetic-model", default="synthetic", help="packaged name or model folder")
    p.add_argument("--xy", type=int, default=250, help="medulla: use the first XY x XY voxels of each section")
    p.add_argument("--synthetic-shape", default="48,160,160", help="held-out synthetic volume, Z,Y,X voxels")
    p.add_argument("--parts", default="medulla_val,synthetic", help="which data sets to score")
    p.add_argument("--skip-fib25", action="store_true", help="leave out the (slow) FIB-25 model")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def scores(seg, gt) -> dict:
    from pipeline.metrics import evaluate

    s = evaluate(seg, gt)
    return {"voi": round(s.voi, 4), "voi_split": round(s.voi_split, 4), "voi_merge": round(s.voi_merge, 4),
            "arand": round(s.arand, 4), "segments": s.segments}


def run_ffn(model, image, name: str) -> tuple[object, dict]:
    from ffn.inference import segment_volume

    t = time.perf_counter()
    seg, stats = segment_volume(image, model)
    dt = time.perf_counter() - t
    print(f"  {name}: {stats['steps']} steps, {stats['segments']} segments, {dt:.0f} s "
          f"({image.size / dt:,.0f} voxels/s)", flush=True)
    return seg, {"seconds": round(dt, 1), "steps": int(stats["steps"])}


def fib25_folder(tmp: Path) -> Path | None:
    """The imported FIB-25 model: packaged ``ffn/models/fib25`` if present, else imported now from the checkpoint."""
    from ffn.model import MODELS_DIR

    if (MODELS_DIR / "fib25" / "config.json").is_file():
        return MODELS_DIR / "fib25"
    if not Path(str(CKPT) + ".index").is_file():
        return None
    from ffn.checkpoint_import import import_checkpoint

    return Path(import_checkpoint(CKPT, tmp / "fib25"))


def evaluate(name: str, train_raw, train_gt, test_raw, test_gt, voxel_size_xyz_nm, our_model, fib25) -> dict:
    from pipeline.baseline import best_baseline, watershed_baseline

    print(f"{name}: test volume {test_raw.shape[::-1]} (XYZ)", flush=True)
    out: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    seg, extra["ffn"] = run_ffn(our_model, test_raw, f"ffn ({our_model})")
    out["ffn"] = scores(seg, test_gt)
    if fib25 is not None:
        seg, extra["fib25"] = run_ffn(fib25, test_raw, "fib25")
        out["fib25"] = scores(seg, test_gt)
    t = time.perf_counter()
    params, train_scores, _ = best_baseline(train_raw, train_gt, voxel_size_xyz_nm)  # chosen on training data
    seg = watershed_baseline(test_raw, voxel_size_xyz_nm, params)
    extra["baseline"] = {"seconds": round(time.perf_counter() - t, 1), "params": params.to_json(),
                         "train_voi": round(train_scores.voi, 3)}
    out["baseline"] = scores(seg, test_gt)
    for method, s in out.items():
        print(f"  {method:9s} VOI {s['voi']:.3f} (split {s['voi_split']:.3f}, merge {s['voi_merge']:.3f}) "
              f"ARAND {s['arand']:.3f} segments {s['segments']}  {extra.get(method, {})}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from ffn.executor import configure_threads

    configure_threads(args.threads, 1)
    import h5py

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fib25 = None if args.skip_fib25 else fib25_folder(Path(tmp))
        if fib25 is None and not args.skip_fib25:
            print("FIB-25 checkpoint not found: fib25 left out", flush=True)
        if "medulla_val" in parts:
            if not MEDULLA.is_file():
                print(f"{MEDULLA} not found: medulla_val left out", flush=True)
            else:
                xy = slice(0, args.xy)
                with h5py.File(MEDULLA, "r") as f:
                    train_raw, train_gt = f["raw"][slice(*TRAIN_Z), xy, xy], f["gt"][slice(*TRAIN_Z), xy, xy]
                    test_raw, test_gt = f["raw"][slice(*VAL_Z), xy, xy], f["gt"][slice(*VAL_Z), xy, xy]
                result["medulla_val"] = evaluate("medulla_val", train_raw, train_gt, test_raw, test_gt,
                                                 (10.0, 10.0, 10.0), args.medulla_model, fib25)
        if "synthetic" in parts:
            from pipeline.synthetic import SynthParams, generate_box

            shape = tuple(int(v) for v in args.synthetic_shape.split(","))
            test_params = SynthParams(seed=SYNTH_TEST_SEED, shape_zyx=shape)
            test = generate_box(test_params, ((0, 0, 0), shape))
            train = generate_box(SynthParams(seed=SYNTH_TRAIN_SEED, shape_zyx=shape), ((0, 0, 0), shape))
            result["synthetic"] = evaluate("synthetic", train["raw"], train["gt"], test["raw"], test["gt"],
                                           test_params.voxel_size_xyz_nm, args.synthetic_model, fib25)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
