"""segment: FFN flood filling per block, written as block-unique fragments.

A block segments its whole read box (write box + overlap) so that objects crossing a face are seen with context
from both sides; it writes only its write box into the fragments volume (one writer per chunk/shard) and keeps
the read-box labels in a small side file, which reconcile needs to compare the two blocks' views of the overlap.
Fragment ids are ``block_id * stride + local_id``: unique by construction, no coordination between blocks.

Block invariance (a volume cut into blocks segments like one block) needs the FFN to make the same decisions on
the voxels near a block face in both blocks that see them. Two things here make the blocks agree:
- seeds come from the image around the read box, not from the read box alone (``seed_context``): the seed
  policy's adaptive edge threshold and distance transform would otherwise move or drop peaks near the read-box
  border, and the first-come rule turns a different seed into a different object; seeds are kept in global
  (z, y, x) order, the order the one-block run uses;
- seeds are only taken in the write box grown by ``seed_reach`` voxels: an object seeded in the outer rim of
  the read box is cut by the read-box border and would claim, first come, voxels of the overlap that the
  neighbour block (which sees the whole object) gives to another object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from storage.box import Block
from storage.volume import open_volume

_MODEL_CACHE: dict[str, Any] = {}


def _model(model_dir: str, tf_threads: int | None = 1):
    """One model per worker process: loading weights per block would dominate small blocks.

    TF's thread pools are sized before the first model is built: one block per worker thread, each block's
    forward passes on `tf_threads` cores (a worker that let TF take every core would fight the other workers)."""
    if model_dir not in _MODEL_CACHE:
        from ffn.executor import configure_threads
        from ffn.model import load_model

        configure_threads(tf_threads, 1)

        _MODEL_CACHE[model_dir] = load_model(model_dir)
    return _MODEL_CACHE[model_dir]


def side_file(work_dir: str | Path, block_id: int) -> Path:
    return Path(work_dir) / f"block-{block_id}.npz"


def save_side_file(path: Path, labels: np.ndarray) -> None:
    """Atomic: a half-written file must never look finished to reconcile (write to a temp name, rename)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, labels=labels)
    os.replace(tmp, path)


def load_side_file(work_dir: str | Path, block_id: int) -> np.ndarray:
    with np.load(side_file(work_dir, block_id)) as f:
        return f["labels"]


def to_global(local: np.ndarray, block_id: int, stride: int) -> np.ndarray:
    out = local.astype(np.uint64)
    fg = out != 0
    out[fg] += np.uint64(block_id) * np.uint64(stride)
    return out


def position_noise(box) -> np.ndarray:
    """Tie-breaking noise in [0, 1e-4) that is a function of the global voxel position only (ffn.seeds draws it
    from a RandomState over the array shape, so the same voxel would get different noise in different blocks)."""
    z, y, x = (np.arange(a, b, dtype=np.uint64) for a, b in zip(box.start, box.stop))
    h = (z[:, None, None] * np.uint64(73856093)) ^ (y[None, :, None] * np.uint64(19349663)) \
        ^ (x[None, None, :] * np.uint64(83492791))
    h = (h * np.uint64(2654435761)) % np.uint64(1 << 20)
    return (h.astype(np.float32) / np.float32(1 << 20)) * np.float32(1e-4)


def global_peak_coords(image: np.ndarray, box, min_distance: int = 3) -> np.ndarray:
    """``ffn.seeds.peak_coords`` (distance-transform peaks of non-edge voxels) with position-based tie-breaking;
    global (z, y, x) coordinates, sorted ascending."""
    from scipy import ndimage
    from skimage.feature import peak_local_max

    img = np.asarray(image, dtype=np.float32)
    edges = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
    filt_edges = edges > ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
    dt = ndimage.distance_transform_edt(~filt_edges).astype(np.float32)
    idxs = peak_local_max(dt + position_noise(box), min_distance=min_distance, threshold_abs=0, threshold_rel=0,
                          exclude_border=False)
    if len(idxs) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    idxs = np.asarray(idxs, dtype=np.int64) + np.asarray(box.start, dtype=np.int64)
    return idxs[np.lexsort((idxs[:, 2], idxs[:, 1], idxs[:, 0]))]


@dataclass(frozen=True)
class BlockSeeds:
    """A seed policy for one block: fixed positions (read-box coordinates) in global (z, y, x) order."""

    coords: tuple

    def __call__(self, canvas) -> Iterator[tuple[int, int, int]]:
        oz, oy, ox = getattr(canvas, "offset", (0, 0, 0))
        sz, sy, sx = canvas.config.scale  # a model that runs downsampled: its voxel holding each seed, once
        return iter(dict.fromkeys((z // sz + oz, y // sy + oy, x // sx + ox) for z, y, x in self.coords))


def outer_faces(block: Block, bounds) -> tuple[tuple[bool, bool], ...]:
    """ZYX (before, after): which faces of the read box lie on the volume's border (no neighbour, no context)."""
    return tuple((block.read.start[i] <= bounds.start[i], block.read.stop[i] >= bounds.stop[i]) for i in range(3))


def block_seeds(volume, block: Block, *, context: Sequence[int], reach: Sequence[int] | None,
                margin: Sequence[int], padded: Sequence[tuple[bool, bool]] = ((False, False),) * 3,
                min_distance: int = 3) -> BlockSeeds:
    """Peaks of the image around the read box (read box + context, clipped to the volume), kept where a FOV fits
    in the read box (or reaches into the padding of a `padded` face) and within `reach` of the write box;
    coordinates relative to the read box."""
    from storage.box import Box

    ctx = block.read.grow(tuple(int(c) for c in context)).intersect(volume.bounds)
    coords = global_peak_coords(volume.read(ctx), ctx, min_distance=min_distance)
    allowed = Box(tuple(s + (0 if lo else int(m)) for s, m, (lo, _) in zip(block.read.start, margin, padded)),
                  tuple(e - (0 if hi else int(m)) for e, m, (_, hi) in zip(block.read.stop, margin, padded)))
    if reach is not None:
        allowed = allowed.intersect(block.write.grow(tuple(int(r) for r in reach)))
    ok = np.all(coords >= np.asarray(allowed.start), axis=1) & np.all(coords < np.asarray(allowed.stop), axis=1)
    rel = coords[ok] - np.asarray(block.read.start)
    return BlockSeeds(tuple((int(z), int(y), int(x)) for z, y, x in rel))


def segment_block(
    block: Block,
    *,
    input_spec: dict,
    fragments_spec: dict,
    work_dir: str,
    model_dir: str,
    stride: int,
    inference: dict,
    fill_missing: bool = False,
    seed_context: Sequence[int] = (0, 0, 0),
    seed_reach: Sequence[int] | None = None,
    tf_threads: int | None = 1,
) -> dict:
    """FFN over the read box -> fragments in the write box; returns fragment ids and sizes (small metadata)."""
    from ffn.inference import segment_volume

    volume = open_volume(input_spec, fill_missing=fill_missing)
    image = volume.read(block.read)
    model, config = _model(model_dir, tf_threads)
    options = dict(inference)
    faces = outer_faces(block, volume.bounds)  # mirror-padded; the other faces have the overlap as context
    if "seed_policy" not in options:
        margin = tuple((f // 2) * s for f, s in zip(config.fov_size, config.scale))  # in the volume's voxels
        options["seed_policy"] = block_seeds(volume, block, context=seed_context, reach=seed_reach, margin=margin,
                                             padded=faces)
    local, stats = segment_volume(image, model, config, pad_faces=faces, **options)
    local = np.asarray(local)
    if local.max(initial=0) >= stride:
        raise RuntimeError(f"block {block.block_id}: {int(local.max())} local ids exceed the id stride {stride}")
    save_side_file(side_file(work_dir, block.block_id), local.astype(np.uint32))
    global_ids = to_global(local, block.block_id, stride)
    write_part = global_ids[block.write.relative_to(block.read).slices]
    open_volume(fragments_spec, mode="r+").write(block.write, write_part)
    ids = np.unique(global_ids)
    ids = ids[ids != 0]
    w_ids, w_counts = np.unique(write_part, return_counts=True)
    keep = w_ids != 0
    return {
        "fragments": ids.tolist(),
        "write_ids": w_ids[keep].tolist(),
        "write_sizes": w_counts[keep].tolist(),
        "steps": int(stats.get("steps", 0)),
        "segments": int(stats.get("segments", len(ids))),
    }
