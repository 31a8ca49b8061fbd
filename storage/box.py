"""Boxes and block grids: how a volume is cut into work.

Everything in memory is ZYX; a person types XYZ. `Box.from_xyz` / `Box.xyz_start` are the one place where the
two meet for boxes, so the conversion is written (and tested) once.

A `BlockGrid` tiles a bounding box with *write boxes* aligned to the output's chunk or shard shape, so that every
output chunk/shard has exactly one writer. A block's *read box* is its write box grown by the halo and clipped at
the bounding box, so neighbouring blocks overlap only in what they read, never in what they write. Block ids are
C-order indices into the grid: stable for a given grid, so they can key tasks, ledgers and label ranges.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from storage.errors import VolumeError

Triple = tuple[int, int, int]


def _triple(values: Sequence[int] | int, name: str) -> Triple:
    if isinstance(values, (int, np.integer)):
        values = (int(values),) * 3
    values = tuple(int(v) for v in values)
    if len(values) != 3:
        raise VolumeError(f"{name} must have 3 values, got {values}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True, order=True)
class Box:
    """Half-open box [start, stop) in ZYX voxel coordinates."""

    start: Triple
    stop: Triple

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _triple(self.start, "box start"))
        object.__setattr__(self, "stop", _triple(self.stop, "box stop"))

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_shape(cls, shape: Sequence[int], start: Sequence[int] = (0, 0, 0)) -> "Box":
        start = _triple(start, "box start")
        shape = _triple(shape, "box shape")
        return cls(start, tuple(a + s for a, s in zip(start, shape)))

    @classmethod
    def from_xyz(cls, start_xyz: Sequence[int], stop_xyz: Sequence[int]) -> "Box":
        """Build from what a person types (x, y, z order)."""
        return cls(tuple(reversed(_triple(start_xyz, "start"))), tuple(reversed(_triple(stop_xyz, "stop"))))

    # --- properties ---------------------------------------------------------------------------
    @property
    def shape(self) -> Triple:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def empty(self) -> bool:
        return self.size == 0

    @property
    def xyz_start(self) -> Triple:
        return tuple(reversed(self.start))  # type: ignore[return-value]

    @property
    def xyz_stop(self) -> Triple:
        return tuple(reversed(self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    # --- geometry ----------------------------------------------------------------------------
    def grow(self, amount: Sequence[int] | int) -> "Box":
        amount = _triple(amount, "grow amount")
        return Box(tuple(a - m for a, m in zip(self.start, amount)), tuple(b + m for b, m in zip(self.stop, amount)))

    def intersect(self, other: "Box") -> "Box":
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop))
        return Box(start, stop)

    def contains(self, other: "Box") -> bool:
        return all(a <= c for a, c in zip(self.start, other.start)) and all(
            d <= b for b, d in zip(self.stop, other.stop)
        )

    def contains_point(self, zyx: Sequence[int]) -> bool:
        return all(a <= p < b for a, p, b in zip(self.start, zyx, self.stop))

    def translate(self, offset: Sequence[int]) -> "Box":
        offset = _triple(offset, "offset")
        return Box(tuple(a + o for a, o in zip(self.start, offset)), tuple(b + o for b, o in zip(self.stop, offset)))

    def relative_to(self, outer: "Box") -> "Box":
        """This box in the coordinates of an array that holds `outer` (for slicing a read buffer)."""
        return self.translate(tuple(-s for s in outer.start))

    def to_json(self) -> dict:
        return {"start_zyx": list(self.start), "stop_zyx": list(self.stop)}

    @classmethod
    def from_json(cls, d: dict) -> "Box":
        return cls(tuple(d["start_zyx"]), tuple(d["stop_zyx"]))

    def __str__(self) -> str:  # what error messages show: XYZ, as a person reads it
        return f"[{','.join(map(str, self.xyz_start))} : {','.join(map(str, self.xyz_stop))}) (xyz)"


@dataclass(frozen=True)
class Block:
    """One unit of work: its stable id, grid index, write box and read box (write box + halo, clipped)."""

    block_id: int
    index: Triple
    write: Box
    read: Box


@dataclass(frozen=True)
class BlockGrid:
    """Write boxes of `block_shape` tiling `bounds`, aligned to `alignment` from the bounds' origin.

    `block_shape` must be a multiple of `alignment` (the output chunk or shard shape) so that no output chunk
    has two writers. Blocks at the far faces are clipped to the bounds. `halo` grows read boxes only.
    """

    bounds: Box
    block_shape: Triple
    halo: Triple = (0, 0, 0)
    alignment: Triple = (1, 1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_shape", _triple(self.block_shape, "block shape"))
        object.__setattr__(self, "halo", _triple(self.halo, "halo"))
        object.__setattr__(self, "alignment", _triple(self.alignment, "alignment"))
        if any(s <= 0 for s in self.block_shape):
            raise VolumeError(f"block shape must be positive, got {self.block_shape} (zyx)")
        if any(h < 0 for h in self.halo):
            raise VolumeError(f"halo must be non-negative, got {self.halo} (zyx)")
        if any(a <= 0 for a in self.alignment):
            raise VolumeError(f"alignment must be positive, got {self.alignment} (zyx)")
        bad = [(s, a) for s, a in zip(self.block_shape, self.alignment) if s % a]
        if bad:
            raise VolumeError(
                f"block shape {self.block_shape} (zyx) is not a multiple of the chunk/shard shape {self.alignment}"
            )
        if self.bounds.empty:
            raise VolumeError(f"cannot tile an empty box {self.bounds}")

    @property
    def grid_shape(self) -> Triple:
        return tuple(-(-s // b) for s, b in zip(self.bounds.shape, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid_shape))

    def __len__(self) -> int:
        return self.num_blocks

    def block_id(self, index: Sequence[int]) -> int:
        index = tuple(int(i) for i in index)
        if len(index) != 3 or not all(0 <= i < g for i, g in zip(index, self.grid_shape)):
            raise VolumeError(f"block index {index} (zyx) is outside the grid of shape {self.grid_shape} (zyx)")
        return int(np.ravel_multi_index(index, self.grid_shape))

    def index_of(self, block_id: int) -> Triple:
        if not 0 <= block_id < self.num_blocks:
            raise VolumeError(f"block id {block_id} is outside the grid of {self.num_blocks} blocks")
        return tuple(int(i) for i in np.unravel_index(block_id, self.grid_shape))  # type: ignore[return-value]

    def block(self, block_id: int) -> Block:
        index = self.index_of(block_id)
        start = tuple(o + i * b for o, i, b in zip(self.bounds.start, index, self.block_shape))
        write = Box.from_shape(self.block_shape, start).intersect(self.bounds)
        read = write.grow(self.halo).intersect(self.bounds)
        return Block(block_id, index, write, read)

    def __iter__(self) -> Iterator[Block]:
        """Blocks in id order, generated lazily (a million-block grid never lives in memory)."""
        for block_id in range(self.num_blocks):
            yield self.block(block_id)

    def neighbours(self, block_id: int, faces_only: bool = True) -> list[int]:
        """Ids of adjacent blocks: the 6 face neighbours, or all 26 when faces_only is False."""
        index = self.index_of(block_id)
        out = []
        for delta in itertools.product((-1, 0, 1), repeat=3):
            if delta == (0, 0, 0) or (faces_only and sum(map(abs, delta)) != 1):
                continue
            other = tuple(i + d for i, d in zip(index, delta))
            if all(0 <= o < g for o, g in zip(other, self.grid_shape)):
                out.append(self.block_id(other))
        return sorted(out)

    def forward_neighbour_pairs(self) -> Iterator[tuple[int, int, int]]:
        """(block_a, block_b, axis) for every face-adjacent pair once, b one step after a along axis."""
        for block_id in range(self.num_blocks):
            index = self.index_of(block_id)
            for axis in range(3):
                other = list(index)
                other[axis] += 1
                if other[axis] < self.grid_shape[axis]:
                    yield block_id, self.block_id(other), axis

    def blocks_in(self, box: Box) -> list[int]:
        """Ids of blocks whose write box intersects `box`."""
        clipped = box.intersect(self.bounds)
        if clipped.empty:
            return []
        lo = [(a - o) // b for a, o, b in zip(clipped.start, self.bounds.start, self.block_shape)]
        hi = [(s - 1 - o) // b for s, o, b in zip(clipped.stop, self.bounds.start, self.block_shape)]
        return sorted(self.block_id(i) for i in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi))))

    def to_json(self) -> dict:
        return {
            "bounds": self.bounds.to_json(),
            "block_shape_zyx": list(self.block_shape),
            "halo_zyx": list(self.halo),
            "alignment_zyx": list(self.alignment),
        }

    @classmethod
    def from_json(cls, d: dict) -> "BlockGrid":
        return cls(Box.from_json(d["bounds"]), tuple(d["block_shape_zyx"]), tuple(d["halo_zyx"]),
                   tuple(d["alignment_zyx"]))


def label_stride(block_shape: Sequence[int], halo: Sequence[int] = (0, 0, 0)) -> int:
    """Ids per block so that `block_id * stride + local_id` is unique across blocks (one id per read voxel max)."""
    return int(np.prod([s + 2 * h for s, h in zip(block_shape, halo)])) + 1
