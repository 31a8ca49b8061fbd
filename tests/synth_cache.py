"""One synthetic volume per (seed, shape, voxel size) per test session: generating is the slow part of these tests."""

from __future__ import annotations

from functools import lru_cache

from pipeline.synthetic import SynthParams, generate_block

VOLUME_128 = dict(seed=7, shape_zyx=(128, 128, 128), voxel_size_xyz_nm=(8.0, 8.0, 40.0))


@lru_cache(maxsize=4)
def _block(seed: int, shape_zyx: tuple, voxel_size_xyz_nm: tuple):
    params = SynthParams(seed=seed, shape_zyx=shape_zyx, voxel_size_xyz_nm=voxel_size_xyz_nm)
    return params, generate_block(params, ((0, 0, 0), shape_zyx))


def synth_volume(seed: int = VOLUME_128["seed"], shape_zyx=VOLUME_128["shape_zyx"],
                 voxel_size_xyz_nm=VOLUME_128["voxel_size_xyz_nm"]):
    """(params, SynthBlock) of a whole generated volume; do not modify the arrays."""
    return _block(int(seed), tuple(shape_zyx), tuple(float(v) for v in voxel_size_xyz_nm))
