"""FFN segmentation quality: our trained FFNs vs the imported FIB-25 model vs a classical watershed baseline.

What it compares, in one run, on the same voxels:
- ``medulla_val``: fly medulla FIB-SEM (../shared/data/flyem_fib_medulla_train), validation sections z 120-169
  (our medulla FFN was trained on z 0-119 only);
- ``synthetic``: a held-out synthetic volume (``pipeline.synthetic``, a seed the synthetic FFN never saw).
For each: our FFN (``--medulla-model`` / ``--synthetic-model``), the published FIB-25 FFN imported from its
google/ffn checkpoint, and the baseline of ``pipeline.baseline`` (smoothed-intensity watershed, the best h of
several chosen on training data: medulla z 0-119 / a synthetic volume with the training seed). Scores from
``pipeline.metrics``: VOI split/merge (bits, lower is better), adapted Rand error, segment counts.

Usage: python benchmarks/ffn_quality.py [--xy 160] [--synthetic-shape 48,96,96] [--skip-fib25] [--threads 2]
       [--cache-dir DIR]   (segmentations keyed by model weights + data; a rerun recomputes only what changed)
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

from common import CKPT, MEDULLA  # noqa: E402 (common also puts the repository on sys.path)
TRAIN_Z, VAL_Z = (0, 120), (120, 170)
SYNTH_TRAIN_SEED, SYNTH_TEST_SEED = 1, 4242  # synthetic_small was trained on seeds 1001-1003 (its TRAINING.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--medulla-model", default="medulla", help="packaged name or model folder")
    p.add_argument("--synthetic-model", default="synthetic_small", help="packaged name or model folder")
    p.add_argument("--xy", type=int, default=160,
                   help="medulla: the first XY x XY voxels of each section (250 = whole sections; 160 keeps the "
                        "FIB-25 run to minutes on 2 cores)")
    p.add_argument("--synthetic-shape", default="48,96,96", help="held-out synthetic volume, Z,Y,X voxels")
    p.add_argument("--parts", default="medulla_val,synthetic", help="which data sets to score")
    p.add_argument("--methods", default="ffn,fib25,baseline", help="which methods to run")
    p.add_argument("--skip-fib25", action="store_true", help="leave out the (slow) FIB-25 model")
    p.add_argument("--cache-dir", default=None, help="reuse segmentations computed before (same model and data)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def scores(seg, gt) -> dict:
    from pipeline.metrics import evaluate

    s = evaluate(seg, gt)
    return {"voi": round(s.voi, 4), "voi_split": round(s.voi_split, 4), "voi_merge": round(s.voi_merge, 4),
            "arand": round(s.arand, 4), "segments": s.segments}


def _digest(*parts) -> str:
    import hashlib

    import numpy as np

    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.shape, p.dtype)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, Path) and p.is_file():
            h.update(p.read_bytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def cached(cache_dir: str | None, key: str, compute):
    """``compute() -> (seg, info)``, stored as ``<cache_dir>/<key>.npz`` when a cache folder is given."""
    import numpy as np

    if cache_dir:
        path = Path(cache_dir) / f"{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return z["seg"], json.loads(str(z["info"]))
    seg, info = compute()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / f"{key}.tmp.npz"
        np.savez_compressed(tmp, seg=seg, info=json.dumps(info))
        os.replace(tmp, Path(cache_dir) / f"{key}.npz")
    return seg, info


def run_ffn(model, image, name: str) -> tuple[object, dict]:
    from ffn.inference import segment_volume

    t = time.perf_counter()
    seg, stats = segment_volume(image, model)
    dt = time.perf_counter() - t
    print(f"  {name}: {stats['steps']} steps, {stats['segments']} segments, {dt:.0f} s "
          f"({image.size / dt:,.0f} voxels/s)", flush=True)
    return seg, {"seconds": round(dt, 1), "steps": int(stats["steps"])}


def model_key(model) -> tuple:
    """Config text + every weight array (not the file's bytes: HDF5 files of equal weights may differ)."""
    import h5py
    import numpy as np

    from ffn.model import CONFIG_FILE, WEIGHTS_FILE, resolve_model

    d = resolve_model(model)
    arrays = []
    with h5py.File(d / WEIGHTS_FILE, "r") as f:
        f.visititems(lambda n, obj: arrays.append((n, np.asarray(obj))) if isinstance(obj, h5py.Dataset) else None)
    return ((d / CONFIG_FILE).read_text(), *[a for _, a in sorted(arrays, key=lambda t: t[0])])


def fib25_folder(tmp: Path) -> Path | None:
    """The imported FIB-25 model: packaged ``ffn/models/fib25`` if present, else imported now from the checkpoint."""
    from ffn.model import MODELS_DIR

    if (MODELS_DIR / "fib25" / "config.json").is_file():
        return MODELS_DIR / "fib25"
    if (tmp / "fib25" / "config.json").is_file():
        return tmp / "fib25"
    if not Path(str(CKPT) + ".index").is_file():
        return None
    from ffn.checkpoint_import import import_checkpoint

    return Path(import_checkpoint(CKPT, tmp / "fib25"))


def evaluate(name: str, train_raw, train_gt, test_raw, test_gt, voxel_size_xyz_nm, our_model, fib25,
             methods, cache_dir) -> dict:
    from pipeline.baseline import DEFAULT_GRID, best_baseline, watershed_baseline

    print(f"{name}: test volume {test_raw.shape[::-1]} (XYZ)", flush=True)
    data_key = _digest(test_raw)
    out: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    models = {"ffn": our_model, "fib25": fib25}
    for method in ("ffn", "fib25"):
        if method in methods and models[method] is not None:
            m = models[method]
            key = f"{name}-{method}-" + _digest(data_key, *model_key(m))
            seg, extra[method] = cached(cache_dir, key, lambda: run_ffn(m, test_raw, f"{method} ({m})"))
            out[method] = scores(seg, test_gt)

    def baseline():
        t = time.perf_counter()
        params, train_scores, _ = best_baseline(train_raw, train_gt, voxel_size_xyz_nm)  # chosen on training data
        seg = watershed_baseline(test_raw, voxel_size_xyz_nm, params)
        return seg, {"seconds": round(time.perf_counter() - t, 1), "params": params.to_json(),
                     "train_voi": round(train_scores.voi, 3)}

    if "baseline" in methods:
        key = f"{name}-baseline-" + _digest(data_key, train_raw, train_gt, DEFAULT_GRID, voxel_size_xyz_nm)
        seg, extra["baseline"] = cached(cache_dir, key, baseline)
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
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    if args.skip_fib25:
        methods.discard("fib25")
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fib25 = fib25_folder(Path(args.cache_dir or tmp)) if "fib25" in methods else None
        if fib25 is None and "fib25" in methods:
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
                                                 (10.0, 10.0, 10.0), args.medulla_model, fib25, methods,
                                                 args.cache_dir)
        if "synthetic" in parts:
            from pipeline.synthetic import SynthParams, generate_box

            shape = tuple(int(v) for v in args.synthetic_shape.split(","))
            test_params = SynthParams(seed=SYNTH_TEST_SEED, shape_zyx=shape)
            test = generate_box(test_params, ((0, 0, 0), shape))
            train = generate_box(SynthParams(seed=SYNTH_TRAIN_SEED, shape_zyx=shape), ((0, 0, 0), shape))
            result["synthetic"] = evaluate("synthetic", train["raw"], train["gt"], test["raw"], test["gt"],
                                           test_params.voxel_size_xyz_nm, args.synthetic_model, fib25, methods,
                                           args.cache_dir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
