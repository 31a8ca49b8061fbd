"""Running an FFN at a coarser resolution than the volume: the model config's ``scale`` (ZYX integer factors).

Why: an FFN's field of view is a fixed number of voxels, so on a finely sampled volume (8 x 8 x 40 nm) each flood
takes many small steps and every step is another chance to leak through a faint membrane. Downsampling XY by 2
gives each FOV four times the tissue, a quarter of the steps per object and half the pixel noise (a 2 x 2 mean),
at a quarter of the compute; the labels come back at full resolution. Connectomics pipelines commonly segment at
a coarser mip for the same reasons. Training reads its volumes through the same functions, so a model only ever
sees data at the scale it declares.

Conventions: the image is mean-pooled (edge-padded to a multiple of the factors); labels and masks take the voxel
at the start of each cell (a mean of ids means nothing); labels go back by repetition and are cropped to the
original shape. Blocks whose read boxes start on multiples of the factors downsample on one global grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def is_identity(scale: Sequence[int]) -> bool:
    return all(int(s) == 1 for s in scale)


def _pad_to_multiple(a: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    pad = [(0, (-n) % int(s)) for n, s in zip(a.shape, scale)]
    return np.pad(a, pad, mode="edge") if any(p for _, p in pad) else a


def downsample_image(image: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """Mean of each ``scale`` cell, float32 (intensities stay on the raw scale the model normalises)."""
    if is_identity(scale):
        return image
    a = _pad_to_multiple(np.asarray(image, np.float32), scale)
    (z, y, x), (sz, sy, sx) = a.shape, scale
    return a.reshape(z // sz, sz, y // sy, sy, x // sx, sx).mean(axis=(1, 3, 5))


def downsample_labels(labels: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """The first voxel of each ``scale`` cell (ids and masks; never averaged)."""
    if is_identity(scale):
        return labels
    a = _pad_to_multiple(np.asarray(labels), scale)
    return a[:: int(scale[0]), :: int(scale[1]), :: int(scale[2])]


def upsample_labels(labels: np.ndarray, scale: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Each voxel repeated ``scale`` times per axis, cropped to ``shape`` (the volume's own)."""
    if is_identity(scale):
        return labels
    out = labels
    for axis, s in enumerate(scale):
        if int(s) > 1:
            out = np.repeat(out, int(s), axis=axis)
    return np.ascontiguousarray(out[tuple(slice(0, int(n)) for n in shape)])
