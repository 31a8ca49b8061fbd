"""Face-max movement: where the FOV goes next while one object is being flooded.

After each FFN step the maximum of each of the 6 faces of the +-delta cube around the FOV centre is a move
candidate if it is above the move threshold (logits; same as the reference's probability test). The
``face_components`` policy takes the maximum of each above-threshold region of a face instead, so a flood follows
every branch of a fork it sees. Candidates are queued FIFO (breadth first; sorted by score only within one step)
and deduplicated on a delta-spaced lattice centred on the object's start, so each lattice cell is evaluated at
most once per object.
"""

from __future__ import annotations

from collections import deque

import numpy as np

Pos = tuple[int, int, int]


POLICIES = ("face_max", "face_components")


def check_policy(movement: str, where: str) -> None:
    """One clear error for an unknown movement policy (model configs and inference options both take one)."""
    if movement not in POLICIES:
        from storage.errors import ConfigError

        raise ConfigError(f"{where}: movement must be one of {POLICIES}, got {movement!r}")


def face_max_moves(logits: np.ndarray, deltas: tuple[int, int, int], threshold: float, *,
                   branches: bool = False) -> list[tuple[float, Pos]]:
    """``[(score, offset_zyx)]`` for face maxima >= threshold, best first (ties: larger offset first).

    ``branches``: one candidate per connected region (8-connected) of above-threshold voxels on each face instead
    of one per face, so an object that forks inside the FOV is followed along every branch (the reference's single
    maximum per face leaves the other branch to a later seed, which makes the result depend on seed order and
    block layout)."""
    center = [s // 2 for s in logits.shape]
    cube = tuple(slice(c - d, c + d + 1) for c, d in zip(center, deltas))
    out: list[tuple[float, Pos]] = []
    for axis, d in enumerate(deltas):
        if d == 0:
            continue
        for off in (-d, d):
            sel = list(cube)
            sel[axis] = center[axis] + off
            face = logits[tuple(sel)]
            for flat in _face_peaks(face, threshold, branches):
                score = float(face.flat[flat])
                i, j = divmod(flat, face.shape[1])
                rel = [i - face.shape[0] // 2, j - face.shape[1] // 2]
                rel.insert(axis, off)
                item = (score, (rel[0], rel[1], rel[2]))
                if item not in out:
                    out.append(item)
    out.sort(reverse=True)
    return out


def _face_peaks(face: np.ndarray, threshold: float, branches: bool) -> list[int]:
    """Flat indices of the face's maximum, or of each above-threshold region's maximum (``branches``)."""
    flat = int(face.argmax())
    if face.flat[flat] < threshold:
        return []
    if not branches:
        return [flat]
    import scipy.ndimage as ndi

    regions, n = ndi.label(face >= threshold, structure=np.ones((3, 3), bool))
    if n == 1:
        return [flat]
    peaks = ndi.maximum_position(face, regions, index=np.arange(1, n + 1))
    return [int(np.ravel_multi_index(p, face.shape)) for p in peaks]


class FaceMaxQueue:
    """FIFO of candidate FOV centres for one object, with the delta-lattice dedupe of the reference."""

    def __init__(self, start: Pos, deltas: tuple[int, int, int], threshold: float, *, branches: bool = False):
        self.branches = branches
        self.start = np.asarray(start, dtype=np.int64)
        self.deltas = np.asarray(deltas, dtype=np.int64)
        self._half = self.deltas // 2
        self._div = np.maximum(self.deltas, 1)
        self.threshold = threshold
        self.queue: deque[Pos] = deque([tuple(int(v) for v in start)])
        self.done: set[tuple[int, int, int]] = set()

    def quantize(self, pos: Pos) -> tuple[int, int, int]:
        q = (np.asarray(pos) - self.start + self._half) // self._div
        return (int(q[0]), int(q[1]), int(q[2]))

    def pop(self, is_valid) -> Pos | None:
        """Next queued position not yet done on the lattice and accepted by ``is_valid``; None when empty."""
        while self.queue:
            pos = self.queue.popleft()
            if self.quantize(pos) in self.done:
                continue
            if is_valid(pos):
                return pos
        return None

    def update(self, logits: np.ndarray, pos: Pos) -> None:
        self.done.add(self.quantize(pos))
        for _, rel in face_max_moves(logits, tuple(int(d) for d in self.deltas), self.threshold,
                                     branches=self.branches):
            self.queue.append((pos[0] + rel[0], pos[1] + rel[1], pos[2] + rel[2]))
