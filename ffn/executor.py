"""Run many canvases against one model: every round, the FOVs all floods need are batched into model calls.

Why: on an accelerator one FFN step is far too small to fill the device, and canvases (blocks, or parallel
floods in one block) are independent between steps, so stacking their FOVs is what makes a GPU pay off. On a
CPU batching gains little; there the speed comes from the forward pass itself (``Forward``: plain backend
convolutions compiled once per batch size, optional bfloat16).

Determinism: canvases are polled and their floods served in a fixed order, and a canvas's result depends only
on its own floods' logits, so the labels do not depend on how canvases are grouped into batches.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ffn.canvas import Canvas
from ffn.model import FFNConfig, get_conv_weights
from storage.errors import ConfigError

ForwardFn = Callable[[np.ndarray], np.ndarray]  # (n, z, y, x, 2) float32 -> (n, z, y, x) float32 logits

PRECISIONS = ("float32", "bfloat16")


def configure_threads(intra: int | None = None, inter: int | None = 1) -> None:
    """Size TensorFlow's thread pools if TF has not started them yet (it ignores changes afterwards). Under
    another Keras backend this does nothing: JAX (a GPU node without TensorFlow) sizes its own pools."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    except RuntimeError:
        pass  # already initialised: keep what is there


def backend_devices() -> list[str]:
    """The Keras backend's device kinds (e.g. ["CPU", "GPU"]), for the log lines that say where a run went."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return sorted({d.platform.upper() for d in jax.devices()})
    import tensorflow as tf

    return sorted({d.device_type for d in tf.config.list_logical_devices()})


class Forward:
    """The convstack_3d forward pass from a Keras model's weights, as plain backend ops.

    Same arithmetic as the Keras model (the tests check they agree), without Keras's per-call overhead, one
    compiled function per batch size. The Keras backend decides which: under TensorFlow, ``tf.nn`` convolutions
    in a ``tf.function`` (fixed input signature, ``jit_compile=False``: XLA is much slower on CPU); under JAX
    (GPU nodes that have no TensorFlow), ``lax`` convolutions in ``jax.jit`` at full float32 precision (no TF32),
    so the logits match the reference checkpoint there too. ``precision="bfloat16"`` runs the convolutions in
    bf16 (oneDNN AVX512-BF16 / GPU tensor cores), accumulating the residual stream in bf16 as Keras mixed
    precision would; the seed addition stays float32.
    """

    def __init__(self, model, config: FFNConfig, precision: str = "float32"):
        import keras

        if precision not in PRECISIONS:
            raise ConfigError(f"FFN precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.config = config
        self.precision = precision
        self.backend = keras.backend.backend()
        if self.backend not in ("tensorflow", "jax"):
            raise ConfigError(f"FFN inference: Keras backend {self.backend!r} is not supported (tensorflow or jax)")
        make = _tensorflow_forward if self.backend == "tensorflow" else _jax_forward
        self._for_shape = make(get_conv_weights(model), config.depth, precision)  # weights converted once
        self._fns: dict[int, Callable[[np.ndarray], np.ndarray]] = {}
        self.calls = 0
        self.fovs = 0
        self.seconds = 0.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = int(x.shape[0])
        fn = self._fns.get(n)
        if fn is None:
            fn = self._fns[n] = self._for_shape((n, *self.config.fov_size, 2))
        t = time.perf_counter()
        y = fn(x)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.fovs += n
        return y


Weights = dict[str, tuple[np.ndarray, np.ndarray]]
ForShape = Callable[[tuple[int, ...]], Callable[[np.ndarray], np.ndarray]]  # input shape -> compiled forward


def jax_precision(precision: str):
    """(dtype, lax precision) of a JAX computation in ``precision``. float32 means float32: XLA on recent GPUs
    would otherwise run convolutions and matmuls in TF32 (10-bit mantissa)."""
    import jax
    import jax.numpy as jnp

    if precision == "bfloat16":
        return jnp.bfloat16, jax.lax.Precision.DEFAULT
    return jnp.float32, jax.lax.Precision.HIGHEST


def _tensorflow_forward(weights: Weights, depth: int, precision: str) -> ForShape:
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    w = {name: (tf.constant(k, dtype), tf.constant(b, dtype)) for name, (k, b) in weights.items()}

    def conv(x, name, relu):
        k, b = w[name]
        y = tf.nn.bias_add(tf.nn.conv3d(x, k, strides=[1, 1, 1, 1, 1], padding="SAME"), b)
        return tf.nn.relu(y) if relu else y

    def residual_relu(x):
        # max(x, 0), not tf.nn.relu: the residual sum feeds both this ReLU and the next skip connection, and
        # Grappler's remapper (oneDNN) tried to fuse conv + bias + add + relu into one op anyway, failing with a
        # "remapper failed" error line per graph; with Maximum it fuses conv + bias + add only. Same values,
        # bit for bit, and no slower.
        return tf.maximum(x, tf.zeros((), x.dtype))

    def forward(inp):
        x = tf.cast(inp, dtype)
        x = conv(conv(x, "conv0_a", True), "conv0_b", False)
        for i in range(1, depth):
            x = x + conv(conv(residual_relu(x), f"conv{i}_a", True), f"conv{i}_b", False)
        update = conv(residual_relu(x), "conv_lom", False)
        return inp[..., 1] + tf.cast(update[..., 0], tf.float32)

    def for_shape(shape):
        fn = tf.function(forward, input_signature=[tf.TensorSpec(shape, tf.float32)], jit_compile=False,
                         reduce_retracing=False)
        return lambda x: fn(x).numpy()

    return for_shape


def _jax_forward(weights: Weights, depth: int, precision: str) -> ForShape:
    import jax
    import jax.numpy as jnp

    dtype, conv_precision = jax_precision(precision)
    w = {name: (jnp.asarray(k, dtype), jnp.asarray(b, dtype)) for name, (k, b) in weights.items()}

    def conv(x, name, relu):
        k, b = w[name]  # Keras Conv3D kernels are (kz, ky, kx, in, out): DHWIO
        y = jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                         precision=conv_precision) + b
        return jnp.maximum(y, 0) if relu else y

    @jax.jit
    def fn(inp):
        x = inp.astype(dtype)
        x = conv(conv(x, "conv0_a", True), "conv0_b", False)
        for i in range(1, depth):
            x = x + conv(conv(jnp.maximum(x, 0), f"conv{i}_a", True), f"conv{i}_b", False)
        update = conv(jnp.maximum(x, 0), "conv_lom", False)
        return inp[..., 1] + update[..., 0].astype(jnp.float32)

    def for_shape(shape):  # one jitted function serves every batch size (XLA compiles each shape once)
        def call(x: np.ndarray) -> np.ndarray:
            if x.shape != shape:
                raise ConfigError(f"FFN forward pass built for input {shape}, got {x.shape}")
            return np.asarray(fn(x))

        return call

    return for_shape


def run_canvases(canvases: Sequence[Canvas], forward: ForwardFn, batch_size: int = 1,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Drive all canvases to completion; returns counts and timings."""
    if batch_size < 1:
        raise ConfigError(f"FFN batch_size must be >= 1, got {batch_size}")
    if not canvases:
        return {"steps": 0, "model_calls": 0, "model_seconds": 0.0, "seconds": 0.0}
    fov = tuple(canvases[0].fov)
    buf = np.empty((batch_size, *fov, 2), dtype=np.float32)
    calls = steps = 0
    model_s = 0.0
    t0 = time.perf_counter()
    while True:
        work = [(c, f) for c in canvases for f in c.pending()]
        if not work:
            break
        for i in range(0, len(work), batch_size):
            chunk = work[i:i + batch_size]
            for j, (c, f) in enumerate(chunk):
                c.fov_input(f, buf[j])
            tm = time.perf_counter()
            logits = forward(buf[: len(chunk)])
            model_s += time.perf_counter() - tm
            calls += 1
            for j, (c, f) in enumerate(chunk):
                c.apply(f, logits[j])
            steps += len(chunk)
        if progress is not None:
            progress({"steps": steps, "segments": sum(c.counters["segments"] for c in canvases)})
    return {"steps": steps, "model_calls": calls, "model_seconds": model_s, "seconds": time.perf_counter() - t0}
