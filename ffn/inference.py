"""Whole-volume FFN inference: the entry points the segmentation stage calls.

``segment_volume(image, model, config)`` -> (uint64 labels 1..n, stats). ``segment_volumes`` does the same for
several volumes (e.g. the blocks a worker holds) sharing one batched executor. ``consensus_segment`` runs the
seeds forward and backward and splits by intersection (the reference's FFN consensus).
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from ffn.canvas import Canvas, InferenceOptions, Restrictor
from ffn.executor import Forward, ForwardFn, run_canvases
from ffn.model import FFNConfig
from ffn.scale import downsample_image, downsample_labels, is_identity, upsample_labels
from ffn.seeds import make_seed_policy
from storage.errors import ConfigError

OPTION_NAMES = ("init_activation", "pad_value", "move_threshold", "segment_threshold", "min_segment_size", "movement",
                "min_boundary_dist")


# Keras model -> {precision: Forward}: a block function called many times per worker must not re-trace the
# forward pass (seconds) for every block.
_FORWARDS: "weakref.WeakKeyDictionary[Any, dict[str, Forward]]" = weakref.WeakKeyDictionary()


def resolve_forward(model, config: FFNConfig | None, precision: str = "float32") -> tuple[ForwardFn, FFNConfig]:
    """A model folder/name, a Keras model (+config), a ``Forward``, or any callable (+config) -> forward, config."""
    if isinstance(model, (str, os.PathLike)):
        from ffn.model import load_model

        model, config = load_model(model)
    if config is None:
        raise ConfigError("segment_volume: pass the FFNConfig with a model object")
    if isinstance(model, Forward) or not hasattr(model, "layers"):
        return model, config
    per_model = _FORWARDS.setdefault(model, {})
    fwd = per_model.get(precision)
    if fwd is None or fwd.config != config:
        fwd = per_model[precision] = Forward(model, config, precision)
    return fwd, config


def _stats(canvas: Canvas, run: dict) -> dict[str, Any]:
    s = dict(canvas.counters)
    off = canvas.offset
    scale = canvas.config.scale  # origins in the caller's voxels, whatever scale the model ran at
    s.update(origins={i: (tuple((p - q) * f for p, q, f in zip(o.start_zyx, off, scale)), o.steps)
                      for i, o in canvas.origins.items()})
    s["seconds"] = run["seconds"]
    return s


Faces = Sequence[tuple[bool, bool]]  # ZYX: (pad before, pad after) per axis


def pad_widths(config: FFNConfig, faces: Faces | bool) -> tuple[tuple[int, int], ...]:
    """The FOV radius on each face to pad (``True`` = all six faces, ``False`` = none)."""
    if isinstance(faces, bool):
        faces = [(faces, faces)] * 3
    return tuple((m if lo else 0, m if hi else 0) for m, (lo, hi) in zip((f // 2 for f in config.fov_size), faces))


def _pad_restrictor(r: Restrictor | np.ndarray | None, widths, shape) -> Restrictor:
    """Padding is never a seed; a movement mask continues into the padding as its edge value."""
    if isinstance(r, np.ndarray):
        r = Restrictor(mask=r)
    r = r or Restrictor()
    seed_mask = np.ones(tuple(s + a + b for s, (a, b) in zip(shape, widths)), dtype=bool)
    seed_mask[tuple(slice(a, a + s) for s, (a, _) in zip(shape, widths))] = (
        False if r.seed_mask is None else r.seed_mask.astype(bool))
    mask = None if r.mask is None else np.pad(r.mask.astype(bool), widths, mode="edge")
    return Restrictor(mask=mask, seed_mask=seed_mask)


def segment_volumes(images: Sequence[np.ndarray], model, config: FFNConfig | None = None, *,
                    restrictors: Sequence[Restrictor | np.ndarray | None] | None = None, batch_size: int = 1,
                    floods_per_canvas: int = 1, seed_policy="peaks", precision: str = "float32",
                    pad_faces: Sequence[Faces | bool] | None = None,
                    progress: Callable[[dict], None] | None = None, **options) -> list[tuple[np.ndarray, dict]]:
    """Segment several volumes with one executor; each result equals running that volume alone.

    ``pad_faces`` (per volume; default: all faces of every volume) mirror-pads the image by the FOV radius
    (reflect) so FOV centres reach the volume's own border voxels. Without it (the reference's behaviour) no seed
    or move lies within a FOV radius of the border, so objects that live near a border are never segmented:
    on a 96 x 96 x 50 medulla crop that left 29% of the voxels unlabelled (VOI 2.13 vs 1.03 padded with the
    FIB-25 model). Padding is never seeded and is cropped away; pass ``False`` for faces with real context
    (a block's overlap with its neighbours).

    A model whose config has a ``scale`` sees each volume downsampled by it (``ffn.scale``); restrictors are
    downsampled with it, seed policies work in the model's voxels (fixed seed positions such as the segment
    stage's ``BlockSeeds`` are mapped by it), and labels and seed origins come back in the volume's voxels."""
    forward, config = resolve_forward(model, config, precision)
    opts = InferenceOptions.from_config(config, **{k: options.pop(k) for k in list(options) if k in OPTION_NAMES})
    if options:
        raise ConfigError(f"segment_volume: unknown option(s) {sorted(options)}")
    restrictors = list(restrictors) if restrictors is not None else [None] * len(images)
    widths = [pad_widths(config, f) for f in (pad_faces if pad_faces is not None else [True] * len(images))]
    canvases = []
    for img, r, w in zip(images, restrictors, widths):
        img, r = downsample_image(img, config.scale), _downsample_restrictor(r, config.scale)
        if any(a or b for a, b in w):
            r = _pad_restrictor(r, w, img.shape)
            img = np.pad(img, w, mode="reflect" if all(s > max(ab) for s, ab in zip(img.shape, w)) else "symmetric")
        canvases.append(Canvas(img, config, opts, restrictor=r, seed_policy=seed_policy, max_floods=floods_per_canvas,
                               offset=tuple(a for a, _ in w)))
    run = run_canvases(canvases, forward, batch_size, progress)
    results = []
    for image, c, w in zip(images, canvases, widths):
        s = _stats(c, run)
        s.update(model_calls=run["model_calls"], model_seconds=run["model_seconds"], batch_size=batch_size)
        labels = c.labels()[tuple(slice(a, n - b) for n, (a, b) in zip(c.shape, w))]
        results.append((upsample_labels(labels, config.scale, image.shape), s))
    return results


def _downsample_restrictor(r: Restrictor | np.ndarray | None, scale) -> Restrictor | np.ndarray | None:
    if r is None or is_identity(scale):
        return r
    if isinstance(r, np.ndarray):
        return downsample_labels(r, scale)
    return Restrictor(mask=None if r.mask is None else downsample_labels(r.mask, scale),
                      seed_mask=None if r.seed_mask is None else downsample_labels(r.seed_mask, scale))


def segment_volume(image: np.ndarray, model, config: FFNConfig | None = None, *,
                   restrictor: Restrictor | np.ndarray | None = None, batch_size: int = 1,
                   floods: int | None = None, seed_policy="peaks", precision: str = "float32",
                   pad_faces: Faces | bool = True, progress: Callable[[dict], None] | None = None,
                   **options) -> tuple[np.ndarray, dict]:
    """Flood-fill one ZYX volume -> (uint64 labels, 1..n in creation order, 0 = background; stats).

    ``image`` holds raw intensities (uint8, or float on the same scale): the model config's image_mean and
    image_stddev normalise it. ``model`` is a model folder/name, a Keras model (with ``config``), a
    ``Forward`` or any callable (n, z, y, x, 2) -> (n, z, y, x) logits. ``precision="bfloat16"`` runs the
    convolutions in bf16 (about 1.7x faster on AVX512-BF16 CPUs; logits move by ~0.1).
    Memory: ~9 bytes/voxel plus 4 bytes/voxel per parallel flood.

    ``floods`` objects are grown at once to fill a batch (default: ``batch_size``); ``floods=1`` is the
    sequential reference algorithm. Results are deterministic for a given seed order and ``floods``.
    ``options`` override the model's inference defaults (thresholds, min_segment_size, min_boundary_dist ZYX).
    ``pad_faces``: see ``segment_volumes``; ``False`` is the reference algorithm on the bare volume.
    """
    floods = batch_size if floods is None else floods
    ((labels, stats),) = segment_volumes([image], model, config, restrictors=[restrictor], batch_size=batch_size,
                                         floods_per_canvas=floods, seed_policy=seed_policy, precision=precision,
                                         pad_faces=[pad_faces], progress=progress, **options)
    return labels, stats


def split_by_intersection(a: np.ndarray, b: np.ndarray, min_size: int = 0) -> np.ndarray:
    """One id per (a, b) pair of non-zero labels; pieces smaller than ``min_size`` become 0.

    Ids are dense 1..n ordered by (a, b), so the result is deterministic.
    """
    if a.shape != b.shape:
        raise ConfigError(f"split_by_intersection: shapes differ {a.shape} vs {b.shape}")
    fg = (a > 0) & (b > 0)
    pairs = np.stack([a[fg].astype(np.uint64), b[fg].astype(np.uint64)], axis=1)
    out = np.zeros(a.shape, dtype=np.uint64)
    if len(pairs) == 0:
        return out
    uniq, inverse, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    keep = counts >= max(min_size, 1)
    new_ids = np.zeros(len(uniq), dtype=np.uint64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    out[fg] = new_ids[inverse.ravel()]
    return out


def consensus_segment(image: np.ndarray, model, config: FFNConfig | None = None, *, split_min_size: int = 1000,
                      seed_policy="peaks", **kwargs) -> tuple[np.ndarray, dict]:
    """Forward and reverse seed order, split by intersection: keeps only what both runs agree is one object."""
    forward, config = resolve_forward(model, config, kwargs.pop("precision", "float32"))
    fwd, s1 = segment_volume(image, forward, config, seed_policy=make_seed_policy(seed_policy), **kwargs)
    rev, s2 = segment_volume(image, forward, config, seed_policy=make_seed_policy(seed_policy, reverse=True), **kwargs)
    labels = split_by_intersection(fwd, rev, split_min_size)
    stats = {"steps": s1["steps"] + s2["steps"], "segments": int(labels.max()),
             "forward": {"steps": s1["steps"], "segments": s1["segments"]},
             "reverse": {"steps": s2["steps"], "segments": s2["segments"]}}
    return labels, stats
