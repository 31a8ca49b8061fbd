"""Training the synapse detector on labelled volumes (synthetic ground truth, ISBI 2012 cleft masks).

Targets come from a cleft label volume (one id per synapse) plus the segmentation and the synapse table: the
presynaptic target is the presynaptic segment's voxels within `radius` of that synapse's cleft, likewise post.
Patches are drawn half around cleft voxels and half anywhere, because clefts are <1% of voxels and a detector
trained on uniform patches learns to say "no" everywhere. The cleft-centred half picks either a cleft voxel
(`positive_sampling="voxel"`: a synapse is seen in proportion to its size) or first a synapse, i.e. a connected
cleft component, and then a voxel in it (`"synapse"`: a cleft 100x smaller than another is then seen as often,
not 100x less often; the synapses the detector finds too faintly to keep are mostly small ones).
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from pipeline.synapse_model import SynapseModelConfig, build_model, save_model
from storage.errors import ConfigError


@dataclass
class TrainingVolume:
    """One labelled volume in memory. `polarity` False = only the cleft channel is known (e.g. ISBI)."""

    image: np.ndarray
    cleft: np.ndarray
    pre: np.ndarray
    post: np.ndarray
    polarity: bool = True
    name: str = ""
    weight: float = 1.0  # relative probability of drawing a patch from this volume

    @functools.cached_property
    def cleft_voxels(self) -> np.ndarray:
        """(n, 3) coordinates of the cleft voxels in C order; computed once, not per patch."""
        return np.argwhere(self.cleft)

    @functools.cached_property
    def cleft_components(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices into `cleft_voxels` grouped by connected cleft component, and each group's start (n + 1)."""
        import cc3d

        labels = cc3d.connected_components(self.cleft != 0, connectivity=26)
        of_voxel = labels[tuple(self.cleft_voxels.T)]
        order = np.argsort(of_voxel, kind="stable")
        return order, np.searchsorted(of_voxel[order], np.arange(1, int(labels.max()) + 2))

    def cleft_centre(self, rng: np.random.Generator, positive_sampling: str) -> np.ndarray:
        """A cleft voxel: uniform over voxels ("voxel") or over components, then voxels ("synapse")."""
        if positive_sampling == "voxel":
            return self.cleft_voxels[rng.integers(len(self.cleft_voxels))]
        order, starts = self.cleft_components
        k = rng.integers(len(starts) - 1)
        return self.cleft_voxels[order[rng.integers(starts[k], starts[k + 1])]]


def polarity_targets(segmentation: np.ndarray, clefts: np.ndarray, pre_of: dict[int, int], post_of: dict[int, int],
                     radius_zyx: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cleft, pre, post) uint8 masks; radius in voxels per axis so anisotropic data get a round neighbourhood."""
    cleft = clefts != 0
    if not cleft.any():
        z = np.zeros(clefts.shape, np.uint8)
        return z, z.copy(), z.copy()
    dist, idx = ndi.distance_transform_edt(~cleft, sampling=[1.0 / r for r in radius_zyx], return_indices=True)
    nearest = clefts[tuple(idx)]
    near = dist <= 1.0
    ids, dense = np.unique(nearest, return_inverse=True)
    dense = dense.reshape(nearest.shape)
    pre_lut = np.array([pre_of.get(int(s), 0) for s in ids], dtype=np.uint64)
    post_lut = np.array([post_of.get(int(s), 0) for s in ids], dtype=np.uint64)
    seg = segmentation.astype(np.uint64)
    pre = near & (seg != 0) & (seg == pre_lut[dense])
    post = near & (seg != 0) & (seg == post_lut[dense])
    return cleft.astype(np.uint8), pre.astype(np.uint8), post.astype(np.uint8)


POSITIVE_SAMPLING = ("voxel", "synapse")


def sample_patch(volume: TrainingVolume, shape: tuple[int, int, int], rng: np.random.Generator,
                 positive_fraction: float = 0.5, section_jump_probability: float = 0.1,
                 positive_sampling: str = "voxel"):
    """A random patch (image, targets (3,...), channel weights (3,)), half of them centred on a cleft voxel."""
    dims = np.array(volume.image.shape)
    shape_a = np.minimum(np.array(shape), dims)
    if rng.random() < positive_fraction and len(volume.cleft_voxels):
        centre = volume.cleft_centre(rng, positive_sampling)
        start = np.clip(centre - shape_a // 2 + rng.integers(-(shape_a // 4), shape_a // 4 + 1), 0, dims - shape_a)
    else:
        start = np.array([rng.integers(0, d - s + 1) for d, s in zip(dims, shape_a)])
    sl = tuple(slice(a, a + s) for a, s in zip(start, shape_a))
    image = volume.image[sl]
    targets = np.stack([volume.cleft[sl], volume.pre[sl], volume.post[sl]]).astype(np.float32)
    weights = np.array([1.0, 1.0, 1.0] if volume.polarity else [1.0, 0.0, 0.0], np.float32)
    # augmentation: flips on every axis, y/x transpose (in-plane symmetric for anisotropic data)
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis)
            targets = np.flip(targets, axis + 1)
    if rng.random() < 0.5:
        image = np.swapaxes(image, 1, 2)
        targets = np.swapaxes(targets, 2, 3)
    gain = rng.uniform(0.85, 1.15)
    image = (image.astype(np.float32) - 128) * gain + 128 + rng.normal(0, 6)
    # per-section brightness jumps, as ssTEM sections (and the synthetic generator) have them
    jump = rng.random(image.shape[0]) < section_jump_probability
    if jump.any():
        image[jump] = image[jump] * rng.uniform(0.75, 1.25, (int(jump.sum()), 1, 1)) + rng.uniform(
            -15.0, 15.0, (int(jump.sum()), 1, 1))
    image = np.clip(image, 0, 255)
    return np.ascontiguousarray(image), np.ascontiguousarray(targets), weights


def backend_step_options() -> dict:
    """`compile` options per Keras backend. JAX always compiles its step with XLA (that is what makes it fast on a
    GPU); TensorFlow and PyTorch run their graph/eager step, because XLA's CPU code for these 3D convolutions is
    slow: a batch-4 U-Net step took 3.5 s under JAX on the 2-core AVX2 machine against 0.4 s with TensorFlow's
    oneDNN kernels."""
    import keras

    return {"jit_compile": keras.backend.backend() == "jax"}


def pack_targets(targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, 3, z, y, x) targets + (B, 3) channel weights -> one channels-last array (B, z, y, x, 6), because a Keras
    loss sees only y_true and y_pred: channels 0-2 are the targets, 3-5 each sample's weights repeated."""
    b, c = weights.shape
    w = np.broadcast_to(weights[:, None, None, None, :], (b, *targets.shape[2:], c))
    return np.concatenate([np.moveaxis(targets, 1, -1), w], axis=-1).astype(np.float32)


def weighted_cleft_loss(pos_weight: tuple[float, float, float]):
    """Sigmoid cross-entropy with a positive-class weight per channel (clefts are <1% of voxels), each (sample,
    channel) weighted by its packed weight (0 masks a channel: ISBI has no polarity) and normalised by the weight
    sum, so a batch's loss does not depend on how many of its samples carry polarity. Written in keras.ops so it
    runs under every backend (the same formula as TensorFlow's weighted_cross_entropy_with_logits)."""
    from keras import ops

    def loss(packed, logits):
        y, w = packed[..., :3], packed[:, 0, 0, 0, 3:]
        q = ops.convert_to_tensor(pos_weight, dtype=logits.dtype)
        softplus_neg = ops.log1p(ops.exp(-ops.abs(logits))) + ops.relu(-logits)  # log(1 + exp(-x)), stable
        ce = (1.0 - y) * logits + (1.0 + (q - 1.0) * y) * softplus_neg
        return ops.sum(ops.mean(ce, axis=(1, 2, 3)) * w) / ops.sum(w)

    return loss


def check_init_from(init_from: str, config: SynapseModelConfig, where: str = "synapse training") -> None:
    """A warm start copies weights layer by layer, so the source must be the configured architecture."""
    from pipeline.synapse_model import load_config

    source = load_config(init_from)
    if source != config:
        raise ConfigError(f"{where}: init_from {init_from} is another model ({source}) than the one configured "
                          f"({config})")


def train(volumes: list[TrainingVolume], config: SynapseModelConfig, out_dir: str | Path, *, steps: int = 2000,
          batch_size: int = 4, patch_shape: tuple[int, int, int] = (24, 64, 64), learning_rate: float = 1e-3,
          cleft_pos_weight: float = 8.0, checkpoint_every: int = 250, seed: int = 0, log_every: int = 25,
          final_lr_fraction: float = 1.0, positive_sampling: str = "voxel", max_wall_s: float | None = None,
          init_from: str | None = None, ema_momentum: float | None = None) -> Path:
    """Adam on weighted sigmoid cross-entropy; checkpoints (and resumes) in out_dir/checkpoint.

    The learning rate follows a cosine from `learning_rate` at step 0 to `final_lr_fraction` of it at `steps`
    (1.0 = constant); it is a function of the step, so a resumed run continues the same schedule. `max_wall_s`
    stops the run early (checkpoint and exported model as at its last step) so it ends inside a job's time limit;
    started again, it resumes where it stopped. `init_from` (a packaged model's name or a model folder of the same
    architecture) warm-starts a run that has no checkpoint yet; Adam starts afresh. `ema_momentum` m keeps an
    exponential moving average of the weights (Keras's optimizer EMA, a window of ~1 / (1 - m) steps, stored in
    the checkpoint) and exports it instead of the last step's weights.

    The step is Keras's own (`compile` + `train_on_batch`), so it is not tied to TensorFlow: `KERAS_BACKEND=jax`
    trains on a GPU node whose stack is JAX and has no TensorFlow (tested; PyTorch should work the same way but is
    not tested). `backend_step_options()` says which compiler each backend uses."""
    from pipeline.synapse_model import normalize

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = compiled_model(config, learning_rate, cleft_pos_weight, ema_momentum)
    optimizer = model.optimizer
    state_file = ckpt_dir / "state.json"
    start_step = 0
    if state_file.exists():
        # the checkpoint carries Adam's moments too (a compiled model's weights file does); built first so they
        # load. A checkpoint seeded with a packaged model's weights alone starts Adam afresh (Keras warns).
        start_step = json.loads(state_file.read_text())["step"]
        optimizer.build(model.trainable_variables)
        model.load_weights(ckpt_dir / "model.weights.h5")
    elif init_from:
        from pipeline.synapse_model import load_model

        check_init_from(init_from, config)
        source, _ = load_model(init_from)
        model.set_weights(source.get_weights())
    rng = np.random.default_rng(seed + start_step)
    p_volume = np.array([v.weight for v in volumes], float)
    p_volume /= p_volume.sum()

    def lr_at(step: int) -> float:
        cos = 0.5 * (1.0 + np.cos(np.pi * min(step / max(steps, 1), 1.0)))
        return learning_rate * (final_lr_fraction + (1.0 - final_lr_fraction) * cos)

    log_path = out_dir / "train_log.csv"
    new_log = not log_path.exists()
    t0 = time.time()
    with open(log_path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "loss", "cleft_precision", "cleft_recall", "seconds"])
        for step in range(start_step, steps):
            if final_lr_fraction != 1.0:
                optimizer.learning_rate.assign(lr_at(step))
            batch = [sample_patch(volumes[rng.choice(len(volumes), p=p_volume)], patch_shape, rng,
                                  positive_sampling=positive_sampling) for _ in range(batch_size)]
            x = np.concatenate([normalize(b[0], config) for b in batch])
            y = np.stack([b[1] for b in batch])
            w = np.stack([b[2] for b in batch])
            loss = model.train_on_batch(x, pack_targets(y, w))
            if (step + 1) % log_every == 0:
                pred = np.asarray(model.predict_on_batch(x))[..., 0] > 0  # after this step's update
                truth = y[:, 0] > 0.5
                tp = float((pred & truth).sum())
                writer.writerow([step + 1, float(loss), tp / max(pred.sum(), 1), tp / max(truth.sum(), 1),
                                 round(time.time() - t0, 1)])
                fh.flush()
            out_of_time = max_wall_s is not None and time.time() - t0 >= max_wall_s
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps or out_of_time:
                model.save_weights(ckpt_dir / "model.weights.h5")
                state_file.write_text(json.dumps({"step": step + 1}))
            if out_of_time:
                break
    if int(np.asarray(optimizer.iterations.value)) > 0:  # an average exists only once this optimizer has stepped
        optimizer.finalize_variable_values(model.trainable_variables)  # (a no-op without ema_momentum)
    return save_model(model, config, out_dir / "model")


def compiled_model(config: SynapseModelConfig, learning_rate: float, cleft_pos_weight: float,
                   ema_momentum: float | None = None):
    """The detector compiled for training (Adam, clipped, the weighted cleft loss); its checkpoints load into
    this."""
    import keras

    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    model = build_model(config)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0, **ema),
                  loss=weighted_cleft_loss((cleft_pos_weight, 2.0, 2.0)), **backend_step_options())
    return model


# ---- data sources -------------------------------------------------------------------------------------------------

def synthetic_volume(seed: int, shape_zyx: tuple[int, int, int], radius_nm: float = 80.0,
                     cleft_dilation_nm: float = 0.0) -> TrainingVolume:
    """A generated volume with cleft, pre and post targets from the generator's ground truth.

    `cleft_dilation_nm` widens the cleft target in-plane: the generator's cleft is the +-18 nm slab of the contact
    plane, two pixels either side at 8 nm, while what the image shows is the dark postsynaptic density and the
    presynaptic density around it; a target covering them is easier to learn and gives the same centroid."""
    from pipeline.synthetic import SynthParams, generate_block
    from storage.box import Box

    params = SynthParams(seed=seed, shape_zyx=shape_zyx)
    block = generate_block(params, Box.from_shape(shape_zyx))
    arrays, table = block.volumes, block.synapses
    pre_of = dict(zip(table["synapse_id"].astype(int), table["pre_segment_id"].astype(int)))
    post_of = dict(zip(table["synapse_id"].astype(int), table["post_segment_id"].astype(int)))
    radius = tuple(radius_nm / v for v in params.voxel_size_zyx)
    cleft, pre, post = polarity_targets(arrays["gt"], arrays["clefts"], pre_of, post_of, radius)
    r = int(round(cleft_dilation_nm / params.voxel_size_zyx[1]))
    if r > 0:
        yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
        disc = (yy ** 2 + xx ** 2 <= r * r)[None]
        cleft = ndi.binary_dilation(cleft > 0, structure=disc).astype(np.uint8)
    return TrainingVolume(arrays["raw"], cleft, pre, post, polarity=True, name=f"synthetic-{seed}")


def isbi_stack(folder: str | Path, sections: range, downsample_xy: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """ISBI 2012 ssTEM (4x4x50 nm): raw and cleft mask (nonzero in synapses/ PNGs), downsampled in-plane by mean
    (raw) and max (clefts) so its pixels match the 8 nm of the synthetic data the same model learns from."""
    from PIL import Image

    from storage.errors import VolumeError
    from storage.pyramid import downsample_mean

    folder = Path(folder)
    if not (folder / "raw").is_dir():
        raise VolumeError(f"ISBI folder {folder} has no raw/ sections")

    def stack(kind: str) -> np.ndarray:
        files = sorted((folder / kind).glob("*.png"))
        return np.stack([np.array(Image.open(files[i])) for i in sections])

    f = (1, downsample_xy, downsample_xy)
    raw = downsample_mean(stack("raw").astype(np.uint8), f)
    syn = stack("synapses") != 0
    z, y, x = syn.shape
    cleft = syn[:, : y // downsample_xy * downsample_xy, : x // downsample_xy * downsample_xy].reshape(
        z, y // downsample_xy, downsample_xy, x // downsample_xy, downsample_xy).max(axis=(2, 4))
    return raw[:, : cleft.shape[1], : cleft.shape[2]], cleft.astype(np.uint8)


def isbi_volume(folder: str | Path, sections: range) -> TrainingVolume:
    """ISBI sections for training the cleft channel only (no polarity labels exist)."""
    raw, cleft = isbi_stack(folder, sections)
    zeros = np.zeros_like(cleft)
    return TrainingVolume(raw, cleft, zeros, zeros.copy(), polarity=False, name=f"isbi-{sections.start}-{sections.stop}")


def parse_training_config(config: str | os.PathLike | dict, *, max_steps: int | None = None,
                          output_dir: str | None = None):
    """Check a synapse training config (see `train_from_config`) without making anything: (model config, `train`
    keyword settings, [(volume maker, weight)], output folder). Raises ConfigError naming the field."""
    from pipeline.config import read_config_file

    if not isinstance(config, dict):
        config = read_config_file(Path(config))
        if not isinstance(config, dict):
            raise ConfigError("synapse training config: expected a mapping at the top level")
    config = {**config, **({"steps": max_steps} if max_steps is not None else {}),
              **({"out": output_dir} if output_dir is not None else {})}
    where = "synapse training config"
    # every value is checked before the (slow) training volumes are made, so a typo fails at once
    try:
        model_config = SynapseModelConfig.from_json_dict(dict(config.get("model", {})), where)
        settings = dict(steps=int(config.get("steps", 2000)), batch_size=int(config.get("batch_size", 4)),
                        patch_shape=tuple(int(n) for n in config.get("patch_shape_zyx", (24, 64, 64))),
                        learning_rate=float(config.get("learning_rate", 1e-3)),
                        final_lr_fraction=float(config.get("final_lr_fraction", 1.0)),
                        seed=int(config.get("seed", 0)),
                        positive_sampling=str(config.get("positive_sampling", "voxel")),
                        max_wall_s=float(config["max_wall_s"]) if config.get("max_wall_s") is not None else None,
                        init_from=str(config["init_from"]) if config.get("init_from") else None,
                        ema_momentum=float(config["ema_momentum"]) if config.get("ema_momentum") else None)
        if settings["ema_momentum"] is not None and not 0.0 < settings["ema_momentum"] < 1.0:
            raise ConfigError(f"{where}: ema_momentum must be in (0, 1), got {settings['ema_momentum']}")
        if settings["positive_sampling"] not in POSITIVE_SAMPLING:
            raise ConfigError(f"{where}: positive_sampling must be one of {POSITIVE_SAMPLING}, "
                              f"got {settings['positive_sampling']!r}")
        sources = []
        for i, entry in enumerate(config["data"]):
            if "synthetic" in entry:
                d = entry["synthetic"]
                make = functools.partial(synthetic_volume, int(d["seed"]), tuple(int(n) for n in d["shape_zyx"]),
                                         cleft_dilation_nm=float(d.get("cleft_dilation_nm", 0.0)))
            elif "isbi" in entry:
                d = entry["isbi"]
                if not (Path(d["folder"]) / "raw").is_dir():
                    raise ConfigError(f"{where}: data[{i}] isbi folder {d['folder']} has no raw/ sections")
                make = functools.partial(isbi_volume, d["folder"], range(int(d["first"]), int(d["stop"])))
            else:
                raise ConfigError(f"{where}: data[{i}] must have 'synthetic' or 'isbi', got {entry}")
            weight = float(entry.get("weight", 1.0))
            if not weight > 0:
                raise ConfigError(f"{where}: data[{i}] weight must be > 0, got {weight}")
            sources.append((make, weight))
        out = Path(config["out"])
        if settings["init_from"]:
            check_init_from(settings["init_from"], model_config, where)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value ({exc})") from None
    return model_config, settings, sources, out


def train_from_config(config: str | os.PathLike | dict, *, max_steps: int | None = None,
                      output_dir: str | None = None) -> Path:
    """`connectome train synapses CONFIG` (a JSON/YAML file or its dict): {"out", "steps", "batch_size",
    "patch_shape_zyx", "learning_rate", "final_lr_fraction", "model": {...}, "data": [{"synthetic": {"seed",
    "shape_zyx"}} | {"isbi": {"folder", "first", "stop"}}]}; a data entry may carry "weight" (relative
    patch-sampling frequency); "positive_sampling" is "voxel" (default) or "synapse" (see the module docstring);
    "max_wall_s" ends training early (see `train`), counted from the first step, not from volume generation;
    "init_from" warm-starts from a model and "ema_momentum" exports the weights' moving average (see `train`).
    ``max_steps`` / ``output_dir`` override "steps" / "out". Training volumes are made in parallel processes
    (spawned, so no TensorFlow state is forked)."""
    model_config, settings, sources, out = parse_training_config(config, max_steps=max_steps, output_dir=output_dir)
    # the slow part, only once the whole config is known to be good. One process per core this job may use (a
    # Slurm/cgroup allocation, not the node), at most 8: each holds a generator's working set of about 1 GB.
    workers = min(len(os.sched_getaffinity(0)), 8, len(sources))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(make) for make, _ in sources]
        volumes = [future.result() for future in futures]
    for volume, (_, weight) in zip(volumes, sources):
        volume.weight = weight
    out.mkdir(parents=True, exist_ok=True)
    return train(volumes, model_config, out, **settings)
