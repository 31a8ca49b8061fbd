"""Class-balanced training coordinates drawn from partition volumes.

google/ffn's ``build_coordinates`` repeats (``np.resize``) every partition class's voxel list to the length of
the largest class, concatenates and shuffles, so every class is drawn equally often. Materialising that list
costs classes x largest-class entries (hundreds of MB for a 250^3 volume); drawing a class uniformly and then a
voxel of it uniformly gives the same distribution from one index list per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ffn.train.partitions import EXCLUDED


@dataclass(frozen=True)
class Coordinate:
    volume: int  # index into the training volumes
    center: tuple[int, int, int]  # ZYX voxel


class BalancedSampler:
    """Draws ``Coordinate``s with every partition class equally likely, over several volumes at once.

    ``margin`` (ZYX) keeps centres far enough from each volume's border for the whole training patch to fit.
    """

    def __init__(self, partitions: Sequence[np.ndarray], margin: Sequence[int]):
        self.shapes = [p.shape for p in partitions]
        margin = tuple(int(m) for m in margin)
        per_class: dict[int, list[np.ndarray]] = {}
        for vol, part in enumerate(partitions):
            inside = np.zeros(part.shape, dtype=bool)
            inner = tuple(slice(m, n - m) for m, n in zip(margin, part.shape))
            inside[inner] = True
            usable = inside & (part != EXCLUDED)
            for cls in np.unique(part[usable]):
                flat = np.flatnonzero(usable & (part == cls))
                # (volume, flat index) packed into one int64 so each class is one array
                per_class.setdefault(int(cls), []).append(flat.astype(np.int64) * len(partitions) + vol)
        self.classes = sorted(per_class)
        self._index = [np.concatenate(per_class[c]) for c in self.classes]
        self._num_volumes = len(partitions)
        if not self.classes:
            raise ValueError("no usable training coordinates (every voxel is excluded or too close to the border)")

    def class_counts(self) -> dict[int, int]:
        return {c: int(a.size) for c, a in zip(self.classes, self._index)}

    def sample(self, rng: np.random.Generator) -> tuple[int, Coordinate]:
        """One coordinate and its class."""
        k = int(rng.integers(len(self.classes)))
        packed = int(self._index[k][rng.integers(self._index[k].size)])
        vol, flat = packed % self._num_volumes, packed // self._num_volumes
        center = tuple(int(v) for v in np.unravel_index(flat, self.shapes[vol]))
        return self.classes[k], Coordinate(vol, center)  # type: ignore[arg-type]
