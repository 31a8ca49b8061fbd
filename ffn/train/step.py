"""One FFN training step per Keras backend: loss, gradient, optimizer update, and the step's logits.

Why not Keras's `train_on_batch`: FFN training writes each step's predictions back into the seed of the next
FOV, so the step must return its logits, and `train_on_batch` returns only the loss. A second forward pass
(`predict_on_batch`) would cost ~25% more per step on CPU. So each backend gets its own ~20 lines:
- TensorFlow (the default): one traced `tf.function` with a GradientTape; XLA off (much slower on CPU).
- JAX (`KERAS_BACKEND=jax`, for GPU nodes whose stack is JAX and has no TensorFlow): Keras's stateless API
  (`stateless_call`, `optimizer.stateless_apply`) in one `jax.jit`; the weights live in the step between calls and
  are written back to the Keras variables by `sync()` before a checkpoint.
Both use sigmoid cross-entropy averaged over voxels, and count true/false positives at logit 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

StepResult = tuple[float, np.ndarray, float, float, float]  # loss, logits, tp, fp, fn


class TrainStep:
    """`step(x, y)` -> (loss, logits, tp, fp, fn) as Python/numpy values; `sync()` before reading the variables."""

    def __init__(self, model, optimizer):
        import keras

        backend = keras.backend.backend()
        if backend == "tensorflow":
            self._step, self.sync = _tensorflow_step(model, optimizer), (lambda: None)
        elif backend == "jax":
            self._step, self.sync = _jax_step(model, optimizer)
        else:
            from storage.errors import ConfigError

            raise ConfigError(f"FFN training: Keras backend {backend!r} is not supported (tensorflow or jax)")

    def __call__(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        return self._step(x, y)


def _tensorflow_step(model, optimizer) -> Callable[[np.ndarray, np.ndarray], StepResult]:
    import tensorflow as tf

    @tf.function(jit_compile=False, reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return (loss, logits) + _counts(logits, y)

    def step(x: np.ndarray, y: np.ndarray) -> StepResult:
        loss, logits, tp, fp, fn = train_step(tf.constant(x), tf.constant(y))
        return float(loss), logits.numpy(), float(tp), float(fp), float(fn)

    return step


def _jax_step(model, optimizer):
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        ce = jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))  # sigmoid CE, stable
        return jnp.mean(ce), (logits, non_trainable)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def train_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, (logits, non_trainable)), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return ((trainable, non_trainable, opt_vars), loss, logits) + _counts(logits, y)

    holder: dict = {}

    def state_from_variables():
        return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                [v.value for v in optimizer.variables])

    def step(x: np.ndarray, y: np.ndarray) -> StepResult:
        if "state" not in holder:  # read lazily: a checkpoint restore or warm start may have set the variables
            holder["state"] = state_from_variables()
        holder["state"], loss, logits, tp, fp, fn = train_step(holder["state"], x, y)
        return float(loss), np.asarray(logits), float(tp), float(fp), float(fn)

    def sync() -> None:
        if "state" not in holder:
            return
        trainable, non_trainable, opt_vars = holder.pop("state")  # re-read after, in case the caller assigns
        for var, value in zip(model.trainable_variables, trainable):
            var.assign(value)
        for var, value in zip(model.non_trainable_variables, non_trainable):
            var.assign(value)
        for var, value in zip(optimizer.variables, opt_vars):
            var.assign(value)

    return step, sync


def _counts(logits, y):
    """(tp, fp, fn) of the voxel predictions at logit 0 against targets > 0.5, in keras.ops (traced by either)."""
    from keras import ops

    pred, true = logits > 0.0, y > 0.5
    count = lambda a: ops.sum(ops.cast(a, "float32"))  # noqa: E731
    return count(pred & true), count(pred & ~true), count(~pred & true)
