"""FFN inference speed: whole-volume steps/s and voxels/s, FIB-25 model and a small model, batch sizes 1..16.

What it compares, in one run on one machine:
- the model call's achieved GFLOP/s against a numpy float32 matmul's GFLOP/s (the machine's practical peak);
- float32 against bfloat16 (oneDNN AVX512-BF16 on CPU), with the segmentation of each variant compared to
  the float32 batch-1 result (adapted Rand error) and, on the medulla crop, to the ground truth;
- batch sizes: on one volume a batch is filled by growing several objects at once (``floods``).
The reference (google/ffn on this 2-core CPU, fp32, FIB-25 model) ran at 105.7 ms/step and 6,894 voxels/s on a
synthetic 160^3 volume; its bf16 forward pass took 60 ms.

Under KERAS_BACKEND=jax (a GPU node without TensorFlow) the model calls run on JAX's device (``ffn.executor``)
and the same-precision peak is JAX's matmul; give ``--fib25-model`` an imported folder there, since importing
the checkpoint needs TensorFlow (``benchmarks/gpu_node.sh speed`` does both).

Usage: python benchmarks/ffn_speed.py [--size 96] [--batches 1,2,4,8,16] [--precisions float32,bfloat16]
Last stdout line: JSON with voxels_per_s, ms_per_step, steps, model_gflop_per_s, matmul_gflop_per_s (FIB-25,
best batch/precision) and small_model {same keys}.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=96, help="edge of the cubic test volume in voxels (issue: 160)")
    p.add_argument("--data", choices=["medulla", "synthetic"], default=None,
                   help="medulla crop (default when ../shared/data is there) or synthetic blobs")
    p.add_argument("--batches", default="1,2,4,8,16", help="batch sizes for the small model")
    p.add_argument("--fib25-batches", default="1,4", help="batch sizes for the FIB-25 model (each is a full run)")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--small-model", default="synthetic_small",
                   help="packaged name or folder; random small model if absent")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-fib25", action="store_true")
    p.add_argument("--fib25-model", default=None,
                   help="an imported FIB-25 model folder (`connectome import-ffn`); default: import the checkpoint "
                        "now, which needs TensorFlow (a JAX-only GPU node is given the folder instead)")
    return p.parse_args(argv)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def backend_matmul_gflops(precision: str, n: int = 4096, reps: int = 3) -> float:
    """The same-precision peak the model call can hope for: the Keras backend's own matmul in ``precision``
    (TensorFlow: oneDNN on CPU; JAX: XLA, at full float32 precision like the forward pass, so on a GPU without
    TF32). numpy's OpenBLAS float32 matmul (the issue's yardstick) sits well below it on this CPU (~250 vs ~480
    GFLOP/s float32; bfloat16 ~840), so model_vs_matmul alone flatters the model."""
    import keras

    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        from ffn.executor import jax_precision

        dtype, hi = jax_precision(precision)
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(dtype)
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=hi))
        run = lambda: mm(a, b).block_until_ready()  # noqa: E731
    else:
        import tensorflow as tf

        dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        a = tf.cast(tf.random.stateless_normal((n, n), (0, 1)), dtype)
        b = tf.cast(tf.random.stateless_normal((n, n), (1, 2)), dtype)
        run = lambda: tf.matmul(a, b).numpy()  # noqa: E731
    run()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def load_volume(kind: str, size: int):
    import numpy as np

    if kind == "medulla":
        import h5py

        with h5py.File(MEDULLA, "r") as f:
            raw = f["raw"][:size, :size, :size]
            gt = f["gt"][:size, :size, :size]
        return np.ascontiguousarray(raw), np.ascontiguousarray(gt)
    # synthetic: random blobs separated by dark membranes (watershed of random points), blurred + noise
    from scipy import ndimage

    rng = np.random.default_rng(0)
    shape = (size,) * 3
    pts = rng.integers(0, size, size=(max(8, size**3 // 6000), 3))
    markers = np.zeros(shape, np.int32)
    markers[tuple(pts.T)] = np.arange(1, len(pts) + 1)
    _, idx = ndimage.distance_transform_edt(markers == 0, return_indices=True)
    gt = markers[tuple(idx)].astype(np.uint64)
    edge = ndimage.morphological_gradient(gt.astype(np.int64), size=3) > 0
    img = np.where(edge, 60.0, 170.0)
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 12, shape)
    return np.clip(img, 0, 255).astype(np.uint8), gt


def adapted_rand_error(seg, gt) -> float:
    """1 - F-score of Rand precision/recall over voxels with gt > 0 (the SNEMI3D / CREMI definition)."""
    import numpy as np
    from scipy import sparse

    try:
        from pipeline.metrics import adapted_rand_error as are  # the project's metric when present

        return float(are(seg, gt))
    except Exception:
        pass
    m = gt.ravel() > 0
    a, b = gt.ravel()[m], seg.ravel()[m]
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    c = sparse.coo_matrix((np.ones(len(a)), (a.ravel(), b.ravel()))).tocsr()
    sum_sq = c.multiply(c).sum()
    sa = np.asarray(c.sum(axis=1)).ravel()
    sb = np.asarray(c.sum(axis=0)).ravel()
    # columns for seg id 0 count as singletons (unlabelled voxels are split from everything)
    prec = sum_sq / (sb**2).sum()
    rec = sum_sq / (sa**2).sum()
    return float(1 - 2 * prec * rec / (prec + rec))


def run_one(image, keras_model, config, precision: str, batch: int) -> dict:
    import numpy as np

    from ffn.executor import Forward
    from ffn.inference import segment_volume

    fwd = Forward(keras_model, config, precision)
    fwd(np.zeros((batch, *config.fov_size, 2), np.float32))  # trace + warm up outside the timing
    if batch > 1:
        fwd(np.zeros((1, *config.fov_size, 2), np.float32))
    fwd.seconds, fwd.calls, fwd.fovs = 0.0, 0, 0
    mm_before = matmul_gflops(reps=3)  # the machine is shared: measure the baseline next to each run
    t = time.perf_counter()
    # the reference's algorithm on the bare volume (no border padding), so steps and voxels/s compare
    labels, stats = segment_volume(image, fwd, config, batch_size=batch, pad_faces=False)
    wall = time.perf_counter() - t
    matmul = (mm_before + matmul_gflops(reps=3)) / 2
    same_precision = backend_matmul_gflops(precision)
    model_gflops = config.flops_per_step() * fwd.fovs / max(fwd.seconds, 1e-9) / 1e9
    steps = max(stats["steps"], 1)
    return {
        "precision": precision, "batch": batch, "steps": stats["steps"], "segments": stats["segments"],
        "seconds": round(wall, 2), "ms_per_step": round(1000 * wall / steps, 2),
        "model_ms_per_step": round(1000 * fwd.seconds / steps, 2),
        "voxels_per_s": round(image.size / wall, 1),
        "model_gflop_per_s": round(model_gflops, 1), "matmul_gflop_per_s": round(matmul, 1),
        "model_vs_matmul": round(model_gflops / matmul, 3),
        "backend_matmul_gflop_per_s": round(same_precision, 1),
        "model_vs_backend_matmul": round(model_gflops / same_precision, 3),
        "model_calls": fwd.calls, "labels": labels,
    }


def sweep(name, image, gt, keras_model, config, precisions, batches, log) -> list[dict]:
    rows = []
    for precision in precisions:
        for batch in batches:
            r = run_one(image, keras_model, config, precision, batch)
            rows.append(r)
    base = rows[0]["labels"]
    for r in rows:
        r["arand_vs_fp32_b1"] = round(adapted_rand_error(r["labels"], base), 4) if base.max() > 0 else None
        if gt is not None:
            r["arand_vs_gt"] = round(adapted_rand_error(r["labels"], gt), 4)
        log(f"{name:6s} {r['precision']:8s} batch {r['batch']:2d}: {r['steps']:6d} steps {r['segments']:4d} segs "
            f"{r['seconds']:8.1f} s  {r['ms_per_step']:7.2f} ms/step (model {r['model_ms_per_step']:6.2f})  "
            f"{r['voxels_per_s']:9.1f} vx/s  {r['model_gflop_per_s']:6.1f} GFLOP/s "
            f"(matmul {r['matmul_gflop_per_s']:6.1f}, backend {r['precision']} matmul {r['backend_matmul_gflop_per_s']:6.1f})  "
            f"ARAND vs fp32-b1 {r['arand_vs_fp32_b1']}" + (f"  vs GT {r.get('arand_vs_gt')}" if gt is not None else ""))
    return rows


def summary(rows) -> dict:
    best = max(rows, key=lambda r: (r["steps"] > 0, r["voxels_per_s"]))  # a run that took no step timed nothing
    keys = ("voxels_per_s", "ms_per_step", "steps", "model_gflop_per_s", "matmul_gflop_per_s", "model_vs_matmul",
            "backend_matmul_gflop_per_s", "model_vs_backend_matmul", "precision", "batch", "segments", "arand_vs_fp32_b1",
            "arand_vs_gt")
    return {k: best[k] for k in keys if k in best}


def main(argv=None) -> int:
    args = parse_args(argv)
    from ffn.executor import backend_devices, configure_threads

    configure_threads(args.threads, 1)
    import numpy as np

    from ffn.model import FFNConfig, build_model, load_model, resolve_model
    from storage.errors import ConnectomeError

    def log(msg):
        print(msg, flush=True)

    kind = args.data or ("medulla" if MEDULLA.is_file() else "synthetic")
    image, gt = load_volume(kind, args.size)
    log(f"volume: {kind} {image.shape} ({image.size:,} voxels), threads {args.threads}")
    matmul = matmul_gflops()
    log(f"numpy float32 matmul 2048^2: {matmul:.1f} GFLOP/s")
    precisions = [p for p in args.precisions.split(",") if p]
    result: dict = {}

    if not args.skip_fib25 and (args.fib25_model or Path(str(CKPT) + ".index").is_file()):
        if args.fib25_model:
            fib_model, fib_cfg = load_model(args.fib25_model)
        else:
            from ffn.checkpoint_import import import_checkpoint

            with tempfile.TemporaryDirectory() as tmp:
                fib_model, fib_cfg = load_model(import_checkpoint(CKPT, Path(tmp) / "fib25"))
        log(f"FIB-25 model: {fib_cfg.num_params():,} params, {fib_cfg.flops_per_step() / 1e9:.1f} GFLOP/step")
        rows = sweep("fib25", image, gt if kind == "medulla" else None, fib_model, fib_cfg, precisions,
                     [int(b) for b in args.fib25_batches.split(",")], log)
        result.update(summary(rows))
        result["runs"] = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    else:
        log("FIB-25 checkpoint not found (or --skip-fib25): FIB-25 figures omitted")

    try:
        small_model, small_cfg = load_model(resolve_model(args.small_model))
        small_note = f"packaged model {args.small_model!r}"
    except ConnectomeError:
        small_cfg = FFNConfig(depth=3, features=16, fov_size=(17, 17, 17), deltas=(4, 4, 4), min_segment_size=100)
        small_model = build_model(small_cfg)
        small_note = "randomly initialised small config (no trained small model found); steps are not meaningful"
    log(f"small model: {small_note}; {small_cfg.num_params():,} params, "
        f"{small_cfg.flops_per_step() / 1e9:.3f} GFLOP/step")
    rows = sweep("small", image, None, small_model, small_cfg, precisions,
                 [int(b) for b in args.batches.split(",")], log)
    result["small_model"] = summary(rows)
    result["small_model"]["note"] = small_note
    result["small_model"]["runs"] = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    import keras

    result.update(volume=kind, size=args.size, threads=args.threads, matmul_gflop_per_s_at_start=round(matmul, 1),
                  backend=keras.backend.backend(), devices=backend_devices(),
                  reference_cpu={"ms_per_step": 105.7, "voxels_per_s": 6894, "volume": "synthetic 160^3"})
    print(json.dumps(result, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
