"""Morton (Z-order) keys for integer nanometre positions, and box -> key ranges.

Why: a box query on a Morton key is a handful of ``morton BETWEEN a AND b`` predicates that both DuckDB (zone
maps of batches sorted by key) and PostgreSQL (a b-tree) answer without geometry extensions (which DuckDB cannot
load offline here). The ranges are a superset of the box; callers add the exact ``x/y/z`` predicates.

The key interleaves 21 bits per axis of ``position_nm >> SHIFT`` (16 nm cells), so positions must lie in
[0, 2**25) nm (33.5 mm) per axis.
"""

from __future__ import annotations

import numpy as np

from storage.errors import QueryError

SHIFT = 4
BITS = 21
MAX_NM = 1 << (BITS + SHIFT)


def _spread(v: np.ndarray) -> np.ndarray:
    """Insert two zero bits between each of the low 21 bits."""
    v = v.astype(np.uint64) & np.uint64(0x1FFFFF)
    v = (v | (v << np.uint64(32))) & np.uint64(0x1F00000000FFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x1F0000FF0000FF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x100F00F00F00F00F)
    v = (v | (v << np.uint64(4))) & np.uint64(0x10C30C30C30C30C3)
    v = (v | (v << np.uint64(2))) & np.uint64(0x1249249249249249)
    return v


def _cells(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64) >> SHIFT


def encode(x_nm, y_nm, z_nm) -> np.ndarray:
    """Morton keys (int64, x in the lowest bit) of positions in nm; positions must be in [0, 2**25)."""
    x, y, z = (np.asarray(a, dtype=np.int64) for a in (x_nm, y_nm, z_nm))
    for name, a in (("x", x), ("y", y), ("z", z)):
        if a.size and (a.min() < 0 or a.max() >= MAX_NM):
            raise QueryError(f"position {name}_nm out of range [0, {MAX_NM}) nm: min {a.min()}, max {a.max()}")
    code = _spread(x >> SHIFT) | (_spread(y >> SHIFT) << np.uint64(1)) | (_spread(z >> SHIFT) << np.uint64(2))
    return code.astype(np.int64)


def _code(cx: int, cy: int, cz: int) -> int:
    return int(encode(np.array([cx << SHIFT]), np.array([cy << SHIFT]), np.array([cz << SHIFT]))[0])


def box_ranges(lo_nm, hi_nm, max_ranges: int = 64) -> list[tuple[int, int]]:
    """Inclusive Morton key ranges covering the box [lo_nm, hi_nm) (XYZ nm), merged and sorted.

    Octree decomposition: cells fully inside become one range; cells crossing the border are split until the
    range budget is spent, then kept whole (a superset; exact coordinate predicates remove the extra rows).
    """
    lo = [max(0, int(v)) for v in lo_nm]
    hi = [min(MAX_NM, int(v)) for v in hi_nm]
    if any(h <= l for l, h in zip(lo, hi)):
        return []
    clo = [v >> SHIFT for v in lo]
    chi = [(v - 1) >> SHIFT for v in hi]
    level = max((a ^ b).bit_length() for a, b in zip(clo, chi))
    origin = tuple((a >> level) << level for a in clo)
    full: list[tuple[tuple[int, int, int], int]] = []
    partial = [origin]
    while partial:
        size = 1 << level
        inside, crossing = [], []
        for o in partial:
            if all(o[i] >= clo[i] and o[i] + size - 1 <= chi[i] for i in range(3)):
                inside.append(o)
            else:
                crossing.append(o)
        full.extend((o, level) for o in inside)
        if not crossing:
            break
        half = size >> 1
        children = [
            (o[0] + dx * half, o[1] + dy * half, o[2] + dz * half)
            for o in crossing for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)
        ]
        children = [c for c in children if all(c[i] <= chi[i] and c[i] + half - 1 >= clo[i] for i in range(3))]
        if level == 0 or len(full) + len(children) > max_ranges:
            full.extend((o, level) for o in crossing)
            break
        partial, level = children, level - 1
    ranges = sorted((_code(*o), _code(*o) + (1 << (3 * lv)) - 1) for o, lv in full)
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
