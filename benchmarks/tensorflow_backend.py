"""TensorFlow's CPU kernels: oneDNN (what the project turns on, storage/tensorflow_env.py) against Eigen (what
TensorFlow falls back to on CPUs without AVX-512 VNNI/BF16 or AMX), side by side in the same run.

Each backend runs in its own process (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads) and times the
models the pipeline runs: a batch-4 forward pass and a training step of the packaged small FFN, a forward pass of
the FIB-25 model (when ../shared/data has its checkpoint), and one view of the synapse U-Net over a 48x192x192
block, each the median of several calls after warm-up.

    python benchmarks/tensorflow_backend.py [--repeats 20] [--threads 2]

Last line: {"eigen": {...}, "onednn": {...}, "speedup": {same keys: Eigen time / oneDNN time}}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import CKPT  # common also puts the repository on sys.path and configures TensorFlow
from storage.tensorflow_env import onednn_enabled

BACKENDS = {"eigen": "0", "onednn": "1"}


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: tracing and the kernels' first-call setup
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * sorted(times)[len(times) // 2], 2)


def measure(repeats: int) -> dict:
    """The timings of this process's backend (called in a child process)."""
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    from ffn.model import load_model as load_ffn
    from pipeline.synapse_model import load_model as load_synapses
    from pipeline.synapse_model import predict

    rng = np.random.default_rng(0)
    out = {"onednn_on": onednn_enabled()}
    ffn, _ = load_ffn("synthetic_small")
    x = rng.random((4, *ffn.inputs[0].shape[1:]), np.float32)
    forward = tf.function(lambda t: ffn(t, training=False))
    out["ffn_small_forward_b4_ms"] = median_ms(lambda: forward(x).numpy(), repeats)
    ffn.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    y = (rng.random((4, *ffn.outputs[0].shape[1:])) > 0.5).astype(np.float32)
    out["ffn_small_train_step_b4_ms"] = median_ms(lambda: ffn.train_on_batch(x, y), repeats)
    if Path(str(CKPT) + ".index").is_file():
        from ffn.checkpoint_import import import_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            fib, _ = load_ffn(import_checkpoint(CKPT, Path(tmp) / "fib25"))
        xf = rng.random((1, *fib.inputs[0].shape[1:]), np.float32)
        fib_forward = tf.function(lambda t: fib(t, training=False))
        out["fib25_forward_b1_ms"] = median_ms(lambda: fib_forward(xf).numpy(), max(5, repeats // 2))
    synapses, config = load_synapses("synapses_small")
    block = rng.integers(0, 256, (48, 192, 192), dtype=np.uint8)
    out["synapse_unet_block_ms"] = median_ms(lambda: predict(synapses, config, block, 1), max(5, repeats // 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return 0
    results = {}
    for name, flag in BACKENDS.items():
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": flag, "TF_NUM_INTRAOP_THREADS": str(args.threads),
               "TF_NUM_INTEROP_THREADS": "1"}
        run = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env,
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    speedup = {k: round(results["eigen"][k] / results["onednn"][k], 2)
               for k in results["onednn"] if k.endswith("_ms") and k in results["eigen"]}
    print(json.dumps({**results, "speedup": speedup}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
