"""The FFN training loop: balanced examples, FOV walks with seed write-back, checkpoints, scalars, export.

How a step works (google/ffn ``train.py``): ``batch_size`` slots each walk the FOV through their own example;
a step takes the next FOV of every slot, runs one optimizer step on the batch (sigmoid cross-entropy against
the 0.95/0.05 target, gradients clipped element-wise), and writes each predicted FOV back into its slot's seed.
A slot whose walk is finished draws a new class-balanced example.

Checkpoints (``output_dir/checkpoints/ckpt-<step>/``: weights, optimizer slots, step, counters) are written
every ``checkpoint_every`` steps and at the end; a new run with the same ``output_dir`` resumes from the latest
one. Scalars go to ``output_dir/scalars.csv``. When ``export_dir`` is set, a model folder (``config.json`` +
weights, loadable with ``ffn.model.load_model``) is refreshed at every checkpoint, so a usable model exists
from the first checkpoint on. With ``ema_momentum`` the export holds the moving average of the weights (the
checkpoint keeps both the training weights and the average, so a resumed run continues both).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ffn.executor import backend_devices, configure_threads
from ffn.model import FFNConfig, build_model, save_model
from ffn.scale import downsample_image, downsample_labels
from ffn.train.augment import augment_patch
from ffn.train.config import TrainConfig
from ffn.train.coordinates import BalancedSampler
from ffn.train.examples import Example, crop_centered, fixed_shifts, patch_size, walk
from ffn.train.partitions import compute_partitions
from ffn.train.step import TrainStep
from ffn.train.volumes import load_training_volume
from storage.errors import ConnectomeError

CSV_FIELDS = ["step", "loss", "precision", "recall", "f1", "learning_rate", "elapsed_s", "steps_per_s"]


class _Slot:
    """One batch slot: its current example and the FOV walk through it."""

    def __init__(self) -> None:
        self.example: Example | None = None
        self.walk = None
        self.position = None


class Trainer:
    """Owns data, model, optimizer and counters of one training run; ``run()`` trains, ``save()`` checkpoints."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print):
        configure_threads(config.threads, config.threads)  # TF only: a JAX GPU node sizes its own pools
        import keras

        self.config = config
        self.log = log
        self.out = Path(config.output_dir)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        masks = []
        scale = config.ffn_config().scale  # the model sees its volumes at this scale, in training as in inference
        for vol in config.volumes:
            image, labels, mask = load_training_volume(vol)
            self.images.append(downsample_image(image, scale))
            self.labels.append(downsample_labels(labels, scale))
            masks.append(None if mask is None else downsample_labels(mask, scale))
        self.out.mkdir(parents=True, exist_ok=True)  # after the volumes load: a bad one leaves no run folder
        stats = np.concatenate([im.ravel()[:: max(1, im.size // 2_000_000)] for im in self.images]).astype(np.float64)
        self.ffn_config: FFNConfig = config.ffn_config(round(float(stats.mean()), 3), round(float(stats.std()), 3))
        fc = self.ffn_config
        self.images = [fc.normalize(im) for im in self.images]
        self.patch_size = patch_size(fc.fov_size, fc.deltas, config.fov_moves)
        lom = config.partitions.lom_radius_xyz[::-1] if config.partitions.lom_radius_xyz else tuple(
            f // 2 + d for f, d in zip(fc.fov_size, fc.deltas))
        partitions = [self._partitions(i, lab, m, lom) for i, (lab, m) in enumerate(zip(self.labels, masks))]
        self.sampler = BalancedSampler(partitions, margin=[p // 2 for p in self.patch_size])
        del partitions
        self.log(f"train: {len(self.images)} volume(s), patch {self.patch_size[::-1]} (XYZ), partition classes "
                 f"{self.sampler.class_counts()}")

        keras.utils.set_random_seed(config.random_seed)
        self.model = build_model(fc)
        if config.init_from:
            self._init_from(config.init_from)
        opt = config.optimizer
        lr = opt.learning_rate
        if opt.decay_steps:
            lr = keras.optimizers.schedules.ExponentialDecay(lr, opt.decay_steps, opt.decay_rate)
        options = {"clipvalue": config.clip_gradient_value} if config.clip_gradient_value else {}
        if config.ema_momentum:
            options.update(use_ema=True, ema_momentum=config.ema_momentum)
        if opt.name == "sgd":
            self.optimizer = keras.optimizers.SGD(lr, momentum=opt.momentum, **options)
        else:
            self.optimizer = keras.optimizers.Adam(lr, **options)
        self.optimizer.build(self.model.trainable_variables)
        self.step = 0
        self.examples = 0
        self.elapsed_s = 0.0
        self.last_scalars: dict[str, float] = {}
        self._rng = np.random.default_rng(config.random_seed)
        self.shifts = fixed_shifts(fc.deltas, config.fov_moves, np.random.default_rng(config.random_seed))
        self.slots = [_Slot() for _ in range(config.batch_size)]
        self._train_step = TrainStep(self.model, self.optimizer)
        devices = backend_devices()
        self.log(f"train: model depth {fc.depth}, {fc.features} features, FOV {fc.fov_size[::-1]} (XYZ), "
                 f"{fc.num_params():,} parameters, devices {devices}")

    # ---- data ----------------------------------------------------------------------------------------------------
    def _partitions(self, index: int, labels: np.ndarray, mask, lom) -> np.ndarray:
        p = self.config.partitions
        vol = self.config.volumes[index]
        key = json.dumps([str(vol.image), str(vol.labels), vol.box_start_xyz, vol.box_stop_xyz, str(vol.mask),
                          list(lom), list(p.thresholds), p.min_size, list(labels.shape)], default=str)
        path = self.out / f"partitions-{index}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"
        if path.is_file():
            return np.load(path)
        t0 = time.time()
        part = compute_partitions(labels, lom, p.thresholds, p.min_size, mask)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, part)
        os.replace(tmp, path)
        self.log(f"train: partitions of volume {index} in {time.time() - t0:.1f} s")
        return part

    def _new_example(self) -> Example:
        _, coord = self.sampler.sample(self._rng)
        image = crop_centered(self.images[coord.volume], coord.center, self.patch_size)
        labels = crop_centered(self.labels[coord.volume], coord.center, self.patch_size)
        image, labels = augment_patch(image, labels, self.config.augment, self._rng)
        self.examples += 1
        return Example.from_patch(image, labels, self.config.seed_pad)

    def _next_position(self, slot: _Slot):
        while True:
            if slot.walk is not None:
                pos = next(slot.walk, None)
                if pos is not None:
                    return pos
            slot.example = self._new_example()
            fc = self.ffn_config
            slot.walk = walk(slot.example, fc.fov_size, fc.deltas, self.config.fov_policy,
                             self.config.move_threshold, self.shifts)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [B, z, y, x, 2], targets [B, z, y, x, 1]) of every slot's next FOV."""
        fov = self.ffn_config.fov_size
        xs, ys = [], []
        for slot in self.slots:
            slot.position = self._next_position(slot)
            ex = slot.example
            xs.append(np.stack([crop_centered(ex.image, slot.position, fov),
                                crop_centered(ex.seed, slot.position, fov)], axis=-1))
            ys.append(crop_centered(ex.target, slot.position, fov)[..., None])
        return np.stack(xs), np.stack(ys)

    def write_back(self, logits: np.ndarray) -> None:
        fov = self.ffn_config.fov_size
        for slot, pred in zip(self.slots, logits):
            crop_centered(slot.example.seed, slot.position, fov)[...] = pred[..., 0]

    # ---- model ---------------------------------------------------------------------------------------------------
    def _init_from(self, source: str) -> None:
        """Warm start: copy conv weights from another model folder by layer name where the shapes match (e.g. the
        first residual modules of the imported FIB-25 model into a shallower network)."""
        from ffn.model import get_conv_weights, load_model

        src, _ = load_model(source)
        weights = get_conv_weights(src)
        copied = []
        for layer in self.model.layers:
            if layer.name in weights and [tuple(w.shape) for w in layer.get_weights()] == [
                    w.shape for w in weights[layer.name]]:
                layer.set_weights(list(weights[layer.name]))
                copied.append(layer.name)
        self.log(f"train: initialised {len(copied)} layer(s) from {source}")

    def learning_rate(self) -> float:
        from keras import ops

        self._train_step.sync()  # under a schedule the rate follows the optimizer's step counter
        return float(ops.convert_to_numpy(self.optimizer.learning_rate))  # a variable, or a tensor under a schedule

    # ---- checkpoints -----------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_root.is_dir():
            return None
        done = sorted(p for p in self.checkpoint_root.glob("ckpt-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def save(self) -> Path:
        """Checkpoint (atomic: written under a temp name, then renamed) and refresh the export folder."""
        self._train_step.sync()
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_root / f"ckpt-{self.step:09d}"
        tmp = self.checkpoint_root / f"tmp-ckpt-{self.step:09d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save_weights(str(tmp / "model.weights.h5"))
        np.savez(tmp / "optimizer.npz", *[v.numpy() for v in self.optimizer.variables])
        state = {"step": self.step, "examples": self.examples, "elapsed_s": self.elapsed_s,
                 "scalars": self.last_scalars, "ffn_config": self.ffn_config.to_json_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in self.checkpoint_root.glob("ckpt-*"))[: -self.config.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        if self.config.export_dir:
            self.export(self.config.export_dir)
        return final

    def export(self, directory: str | os.PathLike) -> Path:
        meta = dict(self.ffn_config.metadata)
        meta["training"] = {"steps": self.step, "examples": self.examples, "batch_size": self.config.batch_size,
                            "wall_s": round(self.elapsed_s, 1), "scalars": self.last_scalars,
                            "volumes": [str(v.name or v.image) for v in self.config.volumes],
                            "init_from": self.config.init_from,
                            "weights": f"ema {self.config.ema_momentum}" if self.config.ema_momentum else "last step"}
        cfg = FFNConfig.from_json_dict({**self.ffn_config.to_json_dict(), "metadata": meta})
        self._train_step.sync()
        with self.averaged_weights():
            return save_model(self.model, cfg, directory)

    @contextmanager
    def averaged_weights(self):
        """Inside: the model holds the moving average of its weights (when ``ema_momentum`` is set); after: the
        training weights again. Call ``self._train_step.sync()`` first."""
        from keras import ops

        if not self.config.ema_momentum or int(ops.convert_to_numpy(self.optimizer.iterations)) == 0:
            yield  # no average yet before the first step (it would be the zeros it starts as)
            return

        training = [ops.convert_to_numpy(v.value).copy() for v in self.model.trainable_variables]
        self.optimizer.finalize_variable_values(self.model.trainable_variables)
        try:
            yield
        finally:
            for var, value in zip(self.model.trainable_variables, training):
                var.assign(value)

    def restore(self, path: Path | None = None) -> bool:
        """Load the latest (or given) checkpoint; False when there is none."""
        path = path or self.latest_checkpoint()
        if path is None:
            return False
        state = json.loads((path / "state.json").read_text())
        saved = FFNConfig.from_json_dict(state["ffn_config"])
        if saved != self.ffn_config:
            raise ConnectomeError(
                f"checkpoint {path}: its model config differs from the training config's (start a new output_dir)")
        self._train_step.sync()  # the step then reads the restored variables at its next call
        self.model.load_weights(str(path / "model.weights.h5"))
        with np.load(path / "optimizer.npz") as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
        if len(arrays) != len(self.optimizer.variables):
            raise ConnectomeError(f"checkpoint {path}: optimizer state does not match the configured optimizer "
                                  f"(optimizer or ema_momentum changed? continue in a new output_dir with init_from)")
        for var, value in zip(self.optimizer.variables, arrays):
            var.assign(value)
        self.step, self.examples = int(state["step"]), int(state["examples"])
        self.elapsed_s = float(state["elapsed_s"])
        self.last_scalars = state.get("scalars", {})
        # a resumed run draws fresh examples from a stream keyed by the step (deterministic per resume point)
        self._rng = np.random.default_rng([self.config.random_seed, self.step])
        self.slots = [_Slot() for _ in range(self.config.batch_size)]
        return True

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict[str, float]:
        """Train until ``max_steps`` (total, counting resumed steps) or ``max_wall_s``; returns the last scalars."""
        max_steps = self.config.max_steps if max_steps is None else max_steps
        csv_path = self.out / "scalars.csv"
        new_file = not csv_path.is_file()
        t_start = time.time()
        base_elapsed = self.elapsed_s
        with open(csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            try:
                self._loop(max_steps, writer, fh, t_start, base_elapsed)
            except KeyboardInterrupt:
                self.save()  # an interrupted run resumes from where it stopped
                self.log(f"train: interrupted, checkpoint at step {self.step}")
                raise
        return self.last_scalars

    def _loop(self, max_steps: int, writer, fh, t_start: float, base_elapsed: float) -> None:
        acc = {"loss": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "n": 0}
        t_window = time.time()
        while self.step < max_steps:
            x, y = self.next_batch()
            loss, logits, tp, fp, fn = self._train_step(x, y)
            self.write_back(logits)
            self.step += 1
            self.elapsed_s = base_elapsed + time.time() - t_start
            acc["loss"] += loss
            acc["tp"] += tp
            acc["fp"] += fp
            acc["fn"] += fn
            acc["n"] += 1
            if self.step % self.config.log_every == 0 or self.step == max_steps:
                now = time.time()
                self.last_scalars = _scalars(acc, self.step, self.learning_rate(), self.elapsed_s,
                                             acc["n"] / max(now - t_window, 1e-9))
                writer.writerow(self.last_scalars)
                fh.flush()
                self.log("step {step} loss {loss:.4f} P {precision:.3f} R {recall:.3f} F1 {f1:.3f} "
                         "({steps_per_s:.2f} steps/s, {elapsed_s:.0f} s)".format(**self.last_scalars))
                acc = {"loss": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "n": 0}
                t_window = now
            out_of_time = self.config.max_wall_s is not None and time.time() - t_start >= self.config.max_wall_s
            if self.step % self.config.checkpoint_every == 0 or self.step == max_steps or out_of_time:
                self.save()
            if out_of_time:
                self.log(f"train: stopping after max_wall_s={self.config.max_wall_s} at step {self.step}")
                break


def _scalars(acc: dict, step: int, lr: float, elapsed: float, rate: float) -> dict[str, float]:
    n = max(acc["n"], 1)
    tp, fp, fn = acc["tp"], acc["fp"], acc["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"step": step, "loss": round(acc["loss"] / n, 6), "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "learning_rate": lr,
            "elapsed_s": round(elapsed, 1), "steps_per_s": round(rate, 3)}


def train(config: TrainConfig, *, max_steps: int | None = None, log: Callable[[str], None] = print) -> Trainer:
    """Train (resuming from ``output_dir`` when it holds a checkpoint); returns the Trainer."""
    trainer = Trainer(config, log=log)
    if trainer.restore():
        log(f"train: resumed from step {trainer.step}")
    trainer.run(max_steps)
    return trainer
