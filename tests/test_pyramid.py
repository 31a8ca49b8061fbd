"""Pyramids: mean for images, mode for labels, blockwise and recorded in each format's metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage.box import Box
from storage.pyramid import build_pyramid, downsample_block, downsample_mean, downsample_mode
from storage.volume import create_volume, open_volume


def test_mean_and_mode_kernels():
    img = np.arange(16, dtype=np.float32).reshape(2, 2, 4)
    np.testing.assert_allclose(downsample_mean(img, (2, 2, 2)), [[[6.5, 8.5]]])
    labels = np.array([[[7, 7], [0, 0]], [[0, 3], [7, 9]]], dtype=np.uint64)  # 7 x3, 0 x3 -> tie to non-zero
    assert downsample_mode(labels, (2, 2, 2)).item() == 7
    labels = np.array([[[5, 5], [5, 1]], [[1, 2], [3, 4]]], dtype=np.uint64)
    assert downsample_mode(labels, (2, 2, 2)).item() == 5
    # anisotropic 2x2x1 (zyx factor 1,2,2) keeps z
    arr = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    out = downsample_mean(arr, (1, 2, 2))
    assert out.shape == (2, 2, 2)
    assert out[1, 1, 1] == np.rint(arr[1, 2:, 2:].mean())
    # odd shapes are padded by edge replication
    assert downsample_mode(np.ones((3, 3, 3), np.uint32), (2, 2, 2)).shape == (2, 2, 2)


def _expected(data, factor_zyx, kind):
    f = factor_zyx
    pad = [(0, (-s) % fi) for s, fi in zip(data.shape, f)]
    return (downsample_mode if kind == "segmentation" else downsample_mean)(np.pad(data, pad, mode="edge"), f)


@pytest.mark.parametrize("url_t, kind, dtype", [
    ("{p}/img.zarr", "image", np.uint8),
    ("precomputed://{p}/seg", "segmentation", np.uint64),
    ("zarr://{p}/seg2.zarr", "segmentation", np.uint32),
    ("{p}/img.n5", "image", np.float32),
])
def test_build_pyramid_blockwise(url_t, kind, dtype, tmp_path):
    url = url_t.format(p=tmp_path)
    shape = (10, 36, 44)
    vol = create_volume(url, shape_zyx=shape, dtype=dtype, voxel_size_xyz_nm=(8, 8, 40), chunk_shape_zyx=(4, 8, 8),
                        kind=kind)
    rng = np.random.default_rng(3)
    data = (rng.integers(0, 4, shape) if kind == "segmentation" else rng.integers(0, 255, shape)).astype(dtype)
    vol.write(vol.bounds, data)
    levels = build_pyramid(url, [(2, 2, 1), (2, 2, 2)])
    assert [lv.voxel_size for lv in levels] == [(16.0, 16.0, 40.0), (32.0, 32.0, 80.0)]
    s1 = open_volume(url, scale=1)
    s2 = open_volume(url, scale=2)
    assert s1.shape == (10, 18, 22) and s2.shape == (5, 9, 11)
    e1 = _expected(data, (1, 2, 2), kind)
    np.testing.assert_array_equal(s1.read(s1.bounds), e1)
    np.testing.assert_array_equal(s2.read(s2.bounds), _expected(e1, (2, 2, 2), kind))
    assert s1.kind == kind and s2.num_scales == 3
    # running one block again rewrites the same bytes (idempotent block function)
    before = s2.read(s2.bounds)
    downsample_block(s1.spec, s2.spec, Box.from_shape((4, 8, 8)))
    np.testing.assert_array_equal(open_volume(s2.spec).read(s2.bounds), before)


def test_scales_recorded_in_metadata(tmp_path):
    zarr = pytest.importorskip("zarr")
    vol = create_volume(f"{tmp_path}/img.zarr", shape_zyx=(8, 16, 16), dtype="uint8", voxel_size_xyz_nm=(4, 4, 4),
                        chunk_shape_zyx=(4, 8, 8), voxel_offset_xyz=(4, 4, 2))
    vol.write(vol.bounds, np.full((8, 16, 16), 9, np.uint8))
    build_pyramid(vol, [(2, 2, 2)])
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1"]
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [8.0, 8.0, 8.0]
    assert (group["1"][:] == 9).all() and group["1"].shape == (4, 8, 8)

    seg = create_volume(f"precomputed://{tmp_path}/seg", shape_zyx=(8, 16, 16), dtype="uint64",
                        voxel_size_xyz_nm=(4, 4, 40), chunk_shape_zyx=(8, 8, 8), kind="segmentation",
                        shard_shape_zyx=(8, 16, 16))
    seg.write(seg.bounds, np.full((8, 16, 16), 5, np.uint64))
    build_pyramid(seg, [(2, 2, 1)])
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert [s["resolution"] for s in info["scales"]] == [[4, 4, 40], [8, 8, 40]]
    assert info["scales"][1]["size"] == [8, 8, 8]
    cloudvolume = pytest.importorskip("cloudvolume")
    cv = cloudvolume.CloudVolume(f"file://{tmp_path}/seg", mip=1, progress=False)
    assert (np.asarray(cv[:, :, :]) == 5).all()
