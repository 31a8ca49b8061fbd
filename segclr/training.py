"""Contrastive training of the SegCLR encoder: NT-Xent on positive pairs of skeleton nodes.

Why this recipe (ported from the published one, sized for CPUs): two augmented, segment-masked cutouts of nodes
of the same cell within a geodesic distance are a positive pair; the other 2B-2 views of the batch are the
negatives. Projections are L2-normalised, similarities divided by temperature 0.1, self-similarity masked, and the
cross-entropy is taken in both directions (symmetric NT-Xent, SimCLR). The published run used LARS with a large
TPU batch; at CPU batch sizes Adam with warmup + cosine decay is the stable choice. Two health figures are logged
at every step: contrastive top-1 accuracy (is a view's most similar other view its partner?) and the collapse
monitor ``std_x_sqrtd`` = mean per-dimension std of L2-normalised embeddings x sqrt(d) (about 1 when the
embeddings spread over the sphere, -> 0 on collapse).

Checkpoints (encoder + projection + optimizer state + step) are written atomically every ``checkpoint_every``
steps; a restarted run resumes from the latest one and, because each step's randomness is derived from
(seed, step), continues exactly as if it had not been interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segclr.cutouts import ScaledRegion
from segclr.pairs import PairSampler
from segclr.skeletons import Skeleton
from storage.errors import ConfigError, ConnectomeError


# ---- loss and monitors (numpy reference + TF) --------------------------------------------------------------------

def ntxent_numpy(z1: np.ndarray, z2: np.ndarray, temperature: float = 0.1) -> float:
    """Reference NT-Xent: mean over all 2B views of -log softmax(sim/t)[partner], self excluded."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    sim = z @ z.T / temperature
    np.fill_diagonal(sim, -np.inf)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    logsum = np.log(np.exp(sim - sim.max(1, keepdims=True)).sum(1)) + sim.max(1)
    return float(np.mean(logsum - sim[np.arange(2 * n), partner]))


def ntxent_loss(z1, z2, temperature: float = 0.1):
    """Symmetric NT-Xent in TF; returns (loss, top1 accuracy)."""
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)
    n = tf.shape(z1)[0]
    sim = tf.matmul(z, z, transpose_b=True) / temperature
    sim = sim - 1e9 * tf.eye(2 * n, dtype=sim.dtype)
    partner = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], axis=0)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=partner, logits=sim))
    top1 = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(sim, axis=1, output_type=tf.int32), partner), tf.float32))
    return loss, top1


def std_x_sqrtd(emb: np.ndarray) -> float:
    """Collapse monitor: mean std over dims of L2-normalised embeddings, x sqrt(d) (~1 healthy, ~0 collapsed)."""
    e = np.asarray(emb, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float(e.std(axis=0).mean() * math.sqrt(e.shape[1]))


# ---- augmentation --------------------------------------------------------------------------------------------------

def augment(cutouts: np.ndarray, rng: np.random.Generator, channels: Sequence[str],
            intensity: float = 0.25) -> np.ndarray:
    """Random flips (any axis subset), permutations of equal-sized axes, and brightness/contrast/gamma on EM
    channels inside the mask: ``clip(x*(1+c) + b, 0, 1) ** 2**g``, c, b ~ U(+-intensity), g ~ U(-1, 1)."""
    out = np.empty_like(cutouts)
    size = cutouts.shape[1:4]
    em_ch = [i for i, c in enumerate(channels) if c in ("masked_em", "em")]
    for i, x in enumerate(cutouts):
        flips = [a for a in range(3) if rng.random() < 0.5]
        if flips:
            x = np.flip(x, axis=flips)
        # permute only axes of equal size (an anisotropic 17x33x33 cutout permutes Y and X)
        groups: dict[int, list[int]] = {}
        for a, s in enumerate(size):
            groups.setdefault(s, []).append(a)
        perm = list(range(3))
        for axes in groups.values():
            if len(axes) > 1:
                shuffled = list(rng.permutation(axes))
                for a, b in zip(axes, shuffled):
                    perm[a] = b
        x = np.transpose(x, perm + [3])
        x = np.array(x, np.float32)
        for c in em_ch:
            inside = x[..., c] > 0 if channels[c] == "masked_em" else np.ones(size, bool)
            v = x[..., c] * (1 + rng.uniform(-intensity, intensity)) + rng.uniform(-intensity, intensity)
            v = np.clip(v, 0, 1) ** (2.0 ** rng.uniform(-1, 1))
            x[..., c] = np.where(inside, v, 0).astype(np.float32)
        out[i] = x
    return out


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion), acting on (Z, Y, X) vectors."""
    q = rng.normal(size=4)
    w, a, b, c = q / np.linalg.norm(q)  # vector part on the (Z, Y, X) axes
    return np.array([[1 - 2 * (b * b + c * c), 2 * (a * b - c * w), 2 * (a * c + b * w)],
                     [2 * (a * b + c * w), 1 - 2 * (a * a + c * c), 2 * (b * c - a * w)],
                     [2 * (a * c - b * w), 2 * (b * c + a * w), 1 - 2 * (a * a + b * b)]])


def rotated_cutouts(region: ScaledRegion, xyz_nm: np.ndarray, segment_ids: np.ndarray, size_zyx: Sequence[int],
                    channels: Sequence[str], rng: np.random.Generator, jitter: np.ndarray | None = None) -> np.ndarray:
    """Like ``region.cutouts`` but each cutout is turned by a uniformly random 3D rotation about its centre (in nm,
    so anisotropic voxels stay right), sampled nearest-neighbour straight from the region (so ``masked_em`` and
    ``mask`` stay consistent; outside the region is 0). The identity rotation gives ``region.cutouts`` exactly.

    Why: flips and axis permutations leave a neurite's direction (up to 48 symmetries) as a cue that tells two
    nearby nodes of one segment from other segments; a contrastive model can win on it without learning the shape
    (calibre, spines, varicosities, sheets) that cell types differ by. Random rotations take that shortcut away."""
    size = np.asarray(size_zyx, np.int64)
    vs = np.asarray(region.voxel_size_nm, np.float64)[::-1] * np.asarray(region.downsample, np.float64)  # ZYX nm
    centres = region.nm_to_index(xyz_nm)
    if jitter is not None:
        centres = centres + np.asarray(jitter, np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in size], indexing="ij"), -1).reshape(-1, 3)
    shape = np.asarray(region.em.shape)
    ids = np.asarray(segment_ids, np.uint64)
    out = np.empty((len(centres), *size, len(channels)), np.float32)
    for i, c in enumerate(centres):
        m = (random_rotation(rng) * vs[None, :]) / vs[:, None]  # diag(1/vs) R diag(vs): output -> input voxels
        src = np.rint(grid @ m.T).astype(np.int64) + c
        inside = np.all((src >= 0) & (src < shape), 1)
        s_in = tuple(src[inside].T)
        em_c = np.zeros(len(grid), np.float32)
        mask = np.zeros(len(grid), bool)
        em_c[inside] = region.em[s_in] * np.float32(1.0 / 255.0)
        mask[inside] = region.seg[s_in] == ids[i]
        for k, ch in enumerate(channels):
            v = np.where(mask, em_c, 0) if ch == "masked_em" else mask if ch == "mask" else em_c
            out[i, ..., k] = v.reshape(tuple(size))
    return out


# ---- data -------------------------------------------------------------------------------------------------------

@dataclass
class TrainingVolume:
    """One region at model scale plus the skeletons (nm) of its segments: what pairs and cutouts come from."""

    region: ScaledRegion
    skeletons: dict[int, Skeleton]


class PairBatcher:
    """Draws B positive pairs from one or more volumes and returns the two augmented views (B, Z, Y, X, C) each."""

    def __init__(self, volumes: Sequence[TrainingVolume], cutout_size: Sequence[int], channels: Sequence[str],
                 max_distance_nm: float, jitter_vx: int = 2, intensity: float = 0.25,
                 min_distance_nm: float = 0.0, rotate: bool = False):
        self.volumes = list(volumes)
        self.samplers = [PairSampler(v.skeletons, max_distance_nm, min_distance_nm) for v in self.volumes]
        self.cutout_size = tuple(int(s) for s in cutout_size)
        self.channels = tuple(channels)
        self.jitter_vx = int(jitter_vx)
        self.intensity = float(intensity)
        self.rotate = bool(rotate)

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray, list]:
        which = rng.integers(len(self.volumes), size=batch_size)
        views1, views2, pairs = [], [], []
        for v in range(len(self.volumes)):
            k = int((which == v).sum())
            if k == 0:
                continue
            vol, sampler = self.volumes[v], self.samplers[v]
            ps = sampler.sample(rng, k)
            pairs += ps
            for which_node, views in (("node_a", views1), ("node_b", views2)):
                xyz = np.stack([vol.skeletons[p.segment_id].vertices[getattr(p, which_node)] for p in ps])
                sids = np.array([p.segment_id for p in ps], np.uint64)
                jit = rng.integers(-self.jitter_vx, self.jitter_vx + 1, size=(k, 3)) if self.jitter_vx else None
                if self.rotate:
                    c = rotated_cutouts(vol.region, xyz, sids, self.cutout_size, self.channels, rng, jitter=jit)
                else:
                    c = vol.region.cutouts(xyz, sids, self.cutout_size, self.channels, jitter=jit)
                views.append(augment(c, rng, self.channels, self.intensity))
        return np.concatenate(views1), np.concatenate(views2), pairs


# ---- the training loop --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Optimisation settings (the model's own settings live in SegCLRConfig)."""

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    temperature: float = 0.1
    max_pair_distance_nm: float = 3000.0
    min_pair_distance_nm: float = 0.0  # > 0: the two views of a pair are at least this far apart on the skeleton
    jitter_vx: int = 2
    rotate: bool = False  # random 3D rotations of every view (rotated_cutouts), on top of flips/permutations
    intensity_augment: float = 0.25
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    threads: int = 1
    max_wall_s: float = 0.0  # 0 = no limit; otherwise stop (after a checkpoint) once exceeded
    init_from: str = ""  # warm start: a checkpoint dir or model folder whose encoder (+ projection) weights seed a
    #                      NEW run (step 0, fresh optimizer); ignored when the workdir has a checkpoint to resume


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    """Holds encoder, projection head and optimizer; one ``train_step`` per batch; checkpoints to ``workdir``."""

    def __init__(self, model_config, train_config: TrainConfig, workdir: str | os.PathLike):
        import keras
        import tensorflow as tf

        from segclr.encoder import build_encoder, build_projection_head

        self.model_config = model_config
        self.cfg = train_config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(train_config.seed)
        self.encoder = build_encoder(model_config)
        self.projection = build_projection_head(model_config)
        self.optimizer = keras.optimizers.AdamW(learning_rate=train_config.learning_rate,
                                                weight_decay=train_config.weight_decay)
        self.variables = self.encoder.trainable_variables + self.projection.trainable_variables
        self.optimizer.build(self.variables)
        self.step = 0
        t = train_config.temperature

        @tf.function(reduce_retracing=True)
        def _step(x1, x2, lr):
            self.optimizer.learning_rate.assign(lr)
            with tf.GradientTape() as tape:
                x = tf.concat([x1, x2], axis=0)
                emb = self.encoder(x, training=True)
                proj = self.projection(emb, training=True)
                n = tf.shape(x1)[0]
                loss, top1 = ntxent_loss(proj[:n], proj[n:], t)
            grads = tape.gradient(loss, self.variables)
            self.optimizer.apply_gradients(zip(grads, self.variables))
            return loss, top1, emb

        self._step = _step

    def train_step(self, x1: np.ndarray, x2: np.ndarray) -> dict[str, float]:
        lr = learning_rate(self.step, self.cfg)
        loss, top1, emb = self._step(x1, x2, np.float32(lr))
        self.step += 1
        return {"step": self.step, "loss": float(loss), "top1": float(top1), "std_x_sqrtd": std_x_sqrtd(emb.numpy()),
                "lr": lr}

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoint"

    def save_checkpoint(self) -> None:
        d = self.checkpoint_dir
        tmp = self.workdir / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.encoder.save_weights(str(tmp / "encoder.weights.h5"))
        self.projection.save_weights(str(tmp / "projection.weights.h5"))
        np.savez(tmp / "optimizer.npz", *[v.numpy() for v in self.optimizer.variables])
        (tmp / "state.json").write_text(json.dumps({"step": self.step,
                                                    "model_config": self.model_config.to_json_dict(),
                                                    "train_config": asdict(self.cfg)}, indent=2))
        old = self.workdir / "checkpoint.old"
        if d.exists():
            os.replace(d, old)
        os.replace(tmp, d)
        if old.exists():
            import shutil
            shutil.rmtree(old)

    def restore_checkpoint(self) -> bool:
        d = self.checkpoint_dir
        if not (d / "state.json").is_file():
            old = self.workdir / "checkpoint.old"  # crash between the two renames
            if (old / "state.json").is_file():
                d = old
            else:
                return False
        state = json.loads((d / "state.json").read_text())
        if state["model_config"] != self.model_config.to_json_dict():
            raise ConnectomeError(f"{d}: checkpoint was written for a different model config; use a new workdir")
        self.encoder.load_weights(str(d / "encoder.weights.h5"))
        self.projection.load_weights(str(d / "projection.weights.h5"))
        with np.load(d / "optimizer.npz") as z:
            values = [z[f"arr_{i}"] for i in range(len(z.files))]
        for var, val in zip(self.optimizer.variables, values):
            var.assign(val)
        self.step = int(state["step"])
        return True

    def init_weights_from(self, path: str | os.PathLike) -> None:
        """Warm start: load encoder weights (and the projection head's, when present) from a checkpoint dir or a
        model folder of the same architecture; the step counter and the optimizer start afresh."""
        d = Path(path)
        enc = d / "encoder.weights.h5"
        if not enc.is_file():
            raise ConnectomeError(f"training init_from {d}: no encoder.weights.h5 there")
        try:
            self.encoder.load_weights(str(enc))
            if (d / "projection.weights.h5").is_file():
                self.projection.load_weights(str(d / "projection.weights.h5"))
        except ValueError as exc:
            raise ConnectomeError(f"training init_from {d}: weights do not fit this model config ({exc})") from None


def train(trainer: Trainer, batcher: PairBatcher, *, log_path: str | os.PathLike | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Run until ``cfg.steps`` (or ``max_wall_s``), checkpointing; returns the log records of this call."""
    cfg = trainer.cfg
    log_path = Path(log_path) if log_path else trainer.workdir / "train_log.jsonl"
    records = []
    t0 = time.time()
    while trainer.step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, trainer.step])
        x1, x2, pairs = batcher.batch(rng, cfg.batch_size)
        t_step = time.time()
        rec = trainer.train_step(x1, x2)
        rec["step_s"] = round(time.time() - t_step, 3)
        rec["mean_pair_distance_nm"] = float(np.mean([p.distance_nm for p in pairs]))
        rec["wall_s"] = round(time.time() - t0, 1)
        records.append(rec)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if progress:
                print(f"step {rec['step']}/{cfg.steps} loss {rec['loss']:.3f} top1 {rec['top1']:.2f} "
                      f"std_x_sqrtd {rec['std_x_sqrtd']:.2f} lr {rec['lr']:.2e} {rec['step_s']:.2f}s/step",
                      flush=True)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            trainer.save_checkpoint()
        if cfg.max_wall_s and time.time() - t0 > cfg.max_wall_s:
            trainer.save_checkpoint()
            break
    return records


# ---- config-driven entry point (`connectome train segclr CONFIG`) ---------------------------------------------------

def _read_config(config_path_or_dict: str | os.PathLike | dict) -> tuple[dict, Path]:
    if isinstance(config_path_or_dict, dict):
        data = dict(config_path_or_dict)
        return data, Path(data.pop("_base", Path.cwd()))
    path = Path(config_path_or_dict)
    if not path.is_file():
        raise ConnectomeError(f"SegCLR training config {path}: file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - parse errors become one line
        raise ConfigError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data, path.parent


def load_training_volume(raw: str, seg: str, downsample: Sequence[int], *, box_xyz: Sequence[Sequence[int]] | None,
                         dust_threshold: int = 50, teasar_params: dict | None = None,
                         slab_shape_zyx: Sequence[int] = (64, 512, 512)) -> TrainingVolume:
    """Read raw + segmentation (whole volume or ``box_xyz`` = [[x0,y0,z0],[x1,y1,z1]]) slab by slab, downsample to
    the model scale, and skeletonize every segment there (model-scale skeletons are plenty for choosing cutout
    centres and cost a fraction of scale 0). ``dust_threshold`` is in model-scale voxels."""
    from storage.box import Box, BlockGrid
    from storage.volume import open_volume

    from segclr.cutouts import aligned_read_box, downsample_em, downsample_seg

    f = tuple(int(d) for d in downsample)
    em_vol, seg_vol = open_volume(raw), open_volume(seg)
    box = seg_vol.bounds if box_xyz is None else Box.from_xyz(box_xyz[0], box_xyz[1])
    box = aligned_read_box(box, f, seg_vol.bounds)
    out_shape = tuple(s // k for s, k in zip(box.shape, f))
    em = np.zeros(out_shape, np.uint8)
    labels = np.zeros(out_shape, np.uint64)
    slab = tuple(max(k, s // k * k) for s, k in zip(slab_shape_zyx, f))
    for b in BlockGrid(box, slab, alignment=f):
        dst = tuple(slice((a - o) // k, (e - o) // k) for a, e, o, k in zip(b.write.start, b.write.stop, box.start, f))
        em[dst] = downsample_em(em_vol.read(b.write), f)
        labels[dst] = downsample_seg(seg_vol.read(b.write), f)
    return training_volume_from_arrays(em, labels, box.start, tuple(seg_vol.voxel_size), f,
                                       dust_threshold=dust_threshold, teasar_params=teasar_params)


def training_volume_from_arrays(em_ds: np.ndarray, seg_ds: np.ndarray, origin_zyx: Sequence[int],
                                voxel_size_nm: Sequence[float], downsample: Sequence[int], *,
                                dust_threshold: int = 50, teasar_params: dict | None = None) -> TrainingVolume:
    """Model-scale arrays (whose first voxel samples scale-0 voxel ``origin_zyx``) -> TrainingVolume with
    skeletons in volume nm (positions of the scale-0 voxels the model-scale voxels were sampled at)."""
    from segclr.cutouts import ScaledRegion
    from segclr.skeletons import skeletonize_region

    f = np.asarray(downsample, np.int64)
    vs0 = np.asarray(voxel_size_nm, np.float64)
    vs_model = vs0 * f[::-1]
    origin = np.asarray(origin_zyx, np.int64)
    skels = skeletonize_region(seg_ds, (0, 0, 0), vs_model, dust_threshold=dust_threshold,
                               teasar_params=teasar_params)
    shift = (origin + f // 2)[::-1] * vs0  # model voxel i samples scale-0 voxel origin + i*f + f//2
    for sk in skels.values():
        sk.vertices = sk.vertices + shift
    region = ScaledRegion(em_ds, seg_ds, tuple(int(o) for o in origin), tuple(float(v) for v in vs0),
                          tuple(int(d) for d in downsample))
    return TrainingVolume(region, skels)


def train_from_config(config_path_or_dict: str | os.PathLike | dict) -> dict[str, Any]:
    """``connectome train segclr CONFIG``: train, checkpoint/resume in ``workdir``, save the model folder.

    Config keys: ``model`` (SegCLRConfig fields, spatial ones as ``*_xyz``), ``training`` (TrainConfig fields),
    ``data``: list of {``raw``, ``seg``, optional ``box_xyz``}, ``workdir``, ``output`` (model folder).
    Returns the final figures (steps, wall time, last loss/top1/std_x_sqrtd).
    """
    from segclr.encoder import SegCLRConfig, save_model

    data, base = _read_config(config_path_or_dict)
    if "output_dir" in data and "output" not in data:
        data["output"] = data.pop("output_dir")
    for key in ("data", "output"):
        if key not in data:
            raise ConfigError(f"SegCLR training config: missing key {key!r}")
    try:
        model_cfg = SegCLRConfig.from_json_dict(data.get("model", {}), where="SegCLR training config: model")
        tcfg = TrainConfig(**data.get("training", {}))
    except TypeError as exc:
        raise ConfigError(f"SegCLR training config: training: {exc}") from None
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(tcfg.threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process (tests, notebooks): keep its settings
        pass
    output = (base / data["output"]).resolve()
    workdir = (base / data.get("workdir", str(output) + ".work")).resolve()
    volumes = []
    for i, d in enumerate(data["data"]):
        if "raw" not in d or "seg" not in d:
            raise ConfigError(f"SegCLR training config: data[{i}] needs 'raw' and 'seg'")
        raw = d["raw"] if "://" in d["raw"] else str((base / d["raw"]).resolve())
        seg = d["seg"] if "://" in d["seg"] else str((base / d["seg"]).resolve())
        volumes.append(load_training_volume(raw, seg, model_cfg.downsample, box_xyz=d.get("box_xyz"),
                                            dust_threshold=int(d.get("dust_threshold", 50))))
    batcher = PairBatcher(volumes, model_cfg.cutout_size, model_cfg.channels, tcfg.max_pair_distance_nm,
                          jitter_vx=tcfg.jitter_vx, intensity=tcfg.intensity_augment,
                          min_distance_nm=tcfg.min_pair_distance_nm, rotate=tcfg.rotate)
    trainer = Trainer(model_cfg, tcfg, workdir)
    resumed = trainer.restore_checkpoint()
    if resumed:
        print(f"resumed from {trainer.checkpoint_dir} at step {trainer.step}", flush=True)
    elif tcfg.init_from:
        init = Path(tcfg.init_from) if "://" in tcfg.init_from else (base / tcfg.init_from).resolve()
        trainer.init_weights_from(init)
        print(f"warm start from {init}", flush=True)
    t0 = time.time()
    records = train(trainer, batcher)
    wall = time.time() - t0
    last = records[-1] if records else {}
    figures = {"steps": trainer.step, "wall_s_this_run": round(wall, 1), "loss": last.get("loss"),
               "top1": last.get("top1"), "std_x_sqrtd": last.get("std_x_sqrtd"), "resumed": resumed}
    meta = dict(model_cfg.metadata, training=asdict(tcfg), figures=figures)
    model_cfg = SegCLRConfig.from_json_dict(dict(model_cfg.to_json_dict(), metadata=meta))
    save_model(trainer.encoder, model_cfg, output)
    figures["output"] = str(output)
    return figures


def train_from_file(config_path: str | os.PathLike, *, max_steps: int | None = None,
                    output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The trainer hook of ``connectome train segclr CONFIG [--max-steps N] [--output-dir DIR]``."""
    data, base = _read_config(config_path)
    data = dict(data)
    data.setdefault("_base", str(base))
    if max_steps is not None:
        data["training"] = dict(data.get("training", {}), steps=int(max_steps))
    if output_dir is not None:
        data["output"] = str(Path(output_dir).resolve())
    figures = train_from_config(data)
    print(json.dumps(figures))
    return figures
