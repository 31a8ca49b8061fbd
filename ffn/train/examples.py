"""Training examples: a patch around a sampled centre, its soft target, and the FOV walk inside it.

An example patch is ``fov_size + 2 * deltas * fov_moves`` so the FOV can move ``fov_moves`` steps in every
direction (google/ffn ``train.py``). The target is "same id as the centre voxel, and not background", softened
to 0.95/0.05. The seed starts at ``logit(seed_pad)`` everywhere and ``logit(0.95)`` at the centre; after every
FOV evaluation the predicted logits are written back into the seed, so later FOVs of the same example see what
the network itself predicted before (no backpropagation through time, as in the reference).

Two FOV policies, as in the reference:
- ``fixed``: the centre, then the 26 offsets of {-d, 0, +d}^3 (times ``fov_moves``) in an order shuffled once per
  process; an offset is visited only if the current seed there is >= ``logit(move_threshold)``.
- ``max_pred``: the inference movement policy inside the patch: breadth-first from the centre, on each face of
  the +-delta cube move to its most confident voxel if that is >= the threshold, never revisiting a delta-grid
  cell and never leaving the patch.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ffn.model import logit

Triple = tuple[int, int, int]
SOFT_TRUE, SOFT_FALSE = 0.95, 0.05


def patch_size(fov_size: Sequence[int], deltas: Sequence[int], fov_moves: int) -> Triple:
    return tuple(int(f) + 2 * int(d) * int(fov_moves) for f, d in zip(fov_size, deltas))  # type: ignore[return-value]


def crop_centered(array: np.ndarray, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``size`` box (odd sizes) centred on ``center``; the caller guarantees it lies inside ``array``."""
    sl = tuple(slice(int(c) - s // 2, int(c) - s // 2 + s) for c, s in zip(center, size))
    return array[sl]


def soft_labels(labels: np.ndarray) -> np.ndarray:
    """0.95 where the voxel has the centre voxel's (non-zero) id, else 0.05."""
    center = labels[tuple(s // 2 for s in labels.shape)]
    same = (labels == center) & (center != 0)
    return np.where(same, np.float32(SOFT_TRUE), np.float32(SOFT_FALSE)).astype(np.float32)


def fixed_shifts(deltas: Sequence[int], fov_moves: int, rng: np.random.Generator) -> list[Triple]:
    """The reference's ``fixed`` order: all non-zero {-d,0,d}^3 (per move) offsets, shuffled once."""
    shifts = []
    for k in range(1, fov_moves + 1):
        for off in itertools.product(*[(-d * k, 0, d * k) if d else (0,) for d in deltas]):
            if any(off) and off not in shifts:
                shifts.append(off)
    order = rng.permutation(len(shifts))
    return [tuple(int(v) for v in shifts[i]) for i in order]  # type: ignore[misc]


def face_max_moves(seed_fov: np.ndarray, deltas: Sequence[int], threshold_logit: float) -> list[tuple[float, Triple]]:
    """(score, offset from the FOV centre) of the most confident voxel on each of the 6 faces of the
    +-delta cube, for faces whose maximum reaches the threshold; as ``movement.get_scored_move_offsets``."""
    center = [s // 2 for s in seed_fov.shape]
    lo = [c - d for c, d in zip(center, deltas)]
    hi = [c + d for c, d in zip(center, deltas)]
    cube = seed_fov[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    out = []
    for axis in range(3):
        if deltas[axis] == 0:
            continue
        for side in (0, -1):
            face = np.take(cube, side, axis=axis)
            if face.size == 0:
                continue
            idx = int(np.nanargmax(face)) if not np.all(np.isnan(face)) else 0
            score = float(face.flat[idx])
            if not score >= threshold_logit:
                continue
            pos2 = np.unravel_index(idx, face.shape)
            pos = list(pos2)
            pos.insert(axis, 0 if side == 0 else cube.shape[axis] - 1)
            off = tuple(int(p + l - c) for p, l, c in zip(pos, lo, center))
            out.append((score, off))
    return out


@dataclass
class Example:
    """One training patch: normalised image, soft target, the seed buffer the walk writes back into."""

    image: np.ndarray  # float32 ZYX
    target: np.ndarray  # float32 ZYX, 0.95/0.05
    seed: np.ndarray  # float32 ZYX logits

    @classmethod
    def from_patch(cls, image: np.ndarray, labels: np.ndarray, seed_pad: float) -> "Example":
        seed = np.full(image.shape, logit(seed_pad), dtype=np.float32)
        seed[tuple(s // 2 for s in image.shape)] = logit(SOFT_TRUE)
        return cls(np.asarray(image, np.float32), soft_labels(labels), seed)

    @property
    def center(self) -> Triple:
        return tuple(s // 2 for s in self.image.shape)  # type: ignore[return-value]


def walk(
    example: Example,
    fov_size: Sequence[int],
    deltas: Sequence[int],
    policy: str,
    move_threshold: float,
    shifts: Sequence[Triple] = (),
) -> Iterator[Triple]:
    """Yield FOV centres (patch coordinates); the caller writes the prediction into ``example.seed`` at each
    before asking for the next one, because the next move depends on it."""
    thr = logit(move_threshold)
    center = np.array(example.center)
    fov = np.array(fov_size)
    limit = (np.array(example.image.shape) - fov) // 2  # how far the FOV centre may move from the patch centre
    if policy == "fixed":
        for off in itertools.chain([(0, 0, 0)], shifts):
            if np.any(np.abs(off) > limit):
                continue
            pos = tuple(int(v) for v in center + off)
            if example.seed[pos] >= thr:
                yield pos  # type: ignore[misc]
        return
    if policy != "max_pred":
        raise ValueError(f"unknown fov policy {policy!r} (fixed, max_pred)")
    queue: collections.deque[Triple] = collections.deque([(0, 0, 0)])
    done: set[Triple] = set()
    grid = np.maximum(np.array(deltas), 1)
    while queue:
        off = np.array(queue.popleft())
        if np.any(np.abs(off) > limit):
            continue
        cell = tuple(int(v) for v in off // grid)
        if cell in done:
            continue
        done.add(cell)  # type: ignore[arg-type]
        pos = tuple(int(v) for v in center + off)
        yield pos  # type: ignore[misc]
        seed_fov = crop_centered(example.seed, pos, fov_size)
        for _, move in sorted(face_max_moves(seed_fov, deltas, thr), reverse=True):
            queue.append(tuple(int(a + b) for a, b in zip(move, off)))  # type: ignore[arg-type]
