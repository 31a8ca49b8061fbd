"""Position-keyed randomness: the reason any sub-box regenerates byte-identically on its own.

Nothing here depends on which box is being generated, only on global coordinates: random generators are keyed by
(seed, kind, integer key...), voxel noise is a hash of (seed, kind, z, y, x), and smooth fields are white noise on a
globally aligned coarse lattice, Gaussian-filtered with a margin and linearly upsampled.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.ndimage as ndi

_M64 = (1 << 64) - 1
_GOLD = 0x9E3779B97F4A7C15


def _mix_int(x: int) -> int:
    x &= _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x


def hash_key(*values: int) -> int:
    """A 64-bit hash of a tuple of (possibly negative) integers; stable across processes and platforms."""
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = _mix_int(h ^ ((int(v) + _GOLD) & _M64))
    return h


def rng_for(*key: int) -> np.random.Generator:
    """A numpy Generator keyed by integers (e.g. seed, kind, super-cell index)."""
    return np.random.Generator(np.random.PCG64(hash_key(*key)))


def _mix_arr(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return x


def hash_uniform(seed: int, kind: int, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 per global integer coordinate (broadcast zz, yy, xx)."""
    with np.errstate(over="ignore"):
        h0 = np.uint64(hash_key(seed, kind))
        z = _mix_arr(np.asarray(zz, dtype=np.int64).view(np.uint64) ^ h0)
        y = _mix_arr(np.asarray(yy, dtype=np.int64).view(np.uint64) * np.uint64(0xD6E8FEB86659FD93) + z)
        h = _mix_arr(np.asarray(xx, dtype=np.int64).view(np.uint64) * np.uint64(0xA0761D6478BD642F) + y)
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def white_noise(seed: int, kind: int, start: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Standard-normal-ish (sum of two uniforms, rescaled) white noise at global voxel coordinates."""
    zz, yy, xx = (np.arange(s, s + n, dtype=np.int64) for s, n in zip(start, shape))
    a = hash_uniform(seed, kind, zz[:, None, None], yy[None, :, None], xx[None, None, :])
    b = hash_uniform(seed, kind + 7919, zz[:, None, None], yy[None, :, None], xx[None, None, :])
    return (a + b - np.float32(1.0)) * np.float32(np.sqrt(6.0))


@lru_cache(maxsize=64)
def _kernel_gain(sigma: float) -> float:
    """std of unit white noise after a 1D Gaussian filter of this sigma (truncate=4, as scipy)."""
    if sigma <= 0:
        return 1.0
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k ** 2).sum()))


def _upsample_axis(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    i0 = np.floor(pos).astype(np.int64)
    w = (pos - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    return a.take(i0, axis=axis) * (1 - w) + a.take(i0 + 1, axis=axis) * w


def smooth_noise(seed: int, kind: int, start: tuple[int, int, int], shape: tuple[int, int, int],
                 sigma: tuple[float, float, float], step: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """Unit-variance smooth Gaussian noise with per-axis correlation `sigma` (voxels), at global coordinates.

    White noise lives on a lattice of spacing `step` aligned to global multiples of `step`; it is filtered there with
    a margin of 4 sigma and linearly interpolated to voxels, so a box and any of its sub-boxes agree exactly.
    """
    sig_c = [s / st for s, st in zip(sigma, step)]
    margin = [int(4.0 * s + 0.5) + 2 for s in sig_c]
    lo = [s // st - m for s, st, m in zip(start, step, margin)]
    hi = [-(-(s + n) // st) + m + 1 for s, n, st, m in zip(start, shape, step, margin)]
    coarse = white_noise(seed, kind, tuple(lo), tuple(h - l for h, l in zip(hi, lo)))
    coarse = ndi.gaussian_filter(coarse, sig_c, mode="constant", truncate=4.0)
    gain = np.prod([_kernel_gain(s) for s in sig_c])
    coarse /= np.float32(gain)
    out = coarse
    for axis in range(3):
        if step[axis] == 1:
            sl = [slice(None)] * 3
            sl[axis] = slice(start[axis] - lo[axis], start[axis] - lo[axis] + shape[axis])
            out = out[tuple(sl)]
        else:
            pos = (np.arange(start[axis], start[axis] + shape[axis]) / step[axis]) - lo[axis]
            out = _upsample_axis(out, axis, pos)
    return np.ascontiguousarray(out, dtype=np.float32)
