"""`connectome import` / `connectome info`, the importers, and a real-data import of the FlyEM medulla sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from storage.box import Box
from storage.importers import import_volume
from storage.volume import open_volume

RNG = np.random.default_rng(7)
STACK = RNG.integers(0, 255, (5, 12, 16), dtype=np.uint8)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_import_h5_to_zarr3_and_info(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    labels = RNG.integers(0, 2**40, (6, 10, 12), dtype=np.uint64)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["volumes/labels"] = labels
        f["other"] = np.zeros(3)
    dst = tmp_path / "seg.zarr"
    rc = main(["import", f"{tmp_path}/in.h5:volumes/labels", str(dst), "--voxel-size", "8", "8", "40",
               "--chunk", "8", "8", "4", "--shard", "16", "16", "8", "--offset", "1", "2", "3"])
    assert rc == 0
    out = _last_json(capsys)
    assert out["shape_xyz"] == [12, 10, 6] and out["kind"] == "segmentation"
    vol = open_volume(str(dst))
    np.testing.assert_array_equal(vol.read(vol.bounds), labels)
    assert vol.voxel_size == (8.0, 8.0, 40.0) and vol.voxel_offset == (1, 2, 3)
    assert vol.chunk_shape == (8, 16, 16) and vol.read_chunk_shape == (4, 8, 8)

    assert main(["info", str(dst)]) == 0
    text = capsys.readouterr().out
    info = json.loads(text.strip().splitlines()[-1])
    assert info["shape_xyz"] == [12, 10, 6] and info["dtype"] == "uint64"
    assert info["voxel_size_nm"] == [8.0, 8.0, 40.0] and info["chunk_xyz"] == [8, 8, 4]
    assert info["write_chunk_xyz"] == [16, 16, 8] and info["sharded"] is True
    assert "12 x 10 x 6 voxels (xyz)" in text and "8 x 8 x 40 nm" in text
    # the HDF5 file itself: shape and dtype, and how to make it a volume
    assert main(["info", f"{tmp_path}/in.h5:volumes/labels"]) == 0
    text = capsys.readouterr().out
    assert json.loads(text.strip().splitlines()[-1]) == {"url": f"{tmp_path}/in.h5:volumes/labels",
                                                         "format": "array file", "shape_xyz": [12, 10, 6],
                                                         "dtype": "uint64"}
    assert "connectome import" in text
    assert main(["info", f"{tmp_path}/in.h5:nope"]) == 2
    assert "has no dataset 'nope'" in capsys.readouterr().err


def test_import_png_directory_to_precomputed(tmp_path, capsys):
    iio = pytest.importorskip("imageio.v3")
    sections = tmp_path / "pngs"
    sections.mkdir()
    for z in range(STACK.shape[0]):  # natural order: 2 before 10
        iio.imwrite(sections / f"sec_{z * 4}.png", STACK[z])
    rc = main(["import", str(sections), f"precomputed://{tmp_path}/img", "--voxel-size", "4", "4", "30"])
    assert rc == 0
    vol = open_volume(f"precomputed://{tmp_path}/img")
    np.testing.assert_array_equal(vol.read(vol.bounds), STACK)
    assert vol.kind == "image" and vol.voxel_size == (4.0, 4.0, 30.0)


def test_import_tiff_glob_and_npy(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    for z in range(STACK.shape[0]):
        tifffile.imwrite(tmp_path / f"s{z:03d}.tif", STACK[z])
    vol = import_volume(f"{tmp_path}/s*.tif", f"{tmp_path}/t.zarr", voxel_size_xyz_nm=(1, 1, 1))
    np.testing.assert_array_equal(vol.read(vol.bounds), STACK)
    np.save(tmp_path / "a.npy", STACK.astype(np.float32))
    assert main(["import", f"{tmp_path}/a.npy", f"{tmp_path}/n.zarr", "--voxel-size", "2", "2", "2"]) == 0
    np.testing.assert_array_equal(open_volume(f"{tmp_path}/n.zarr").read(Box.from_shape(STACK.shape)), STACK)


def test_import_errors_are_one_line(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["raw"] = STACK
    cases = [
        ([f"{tmp_path}/missing.h5:raw"], "missing.h5 does not exist"),
        ([f"{tmp_path}/in.h5:nope"], "has no dataset 'nope'"),
        ([f"{tmp_path}/empty_dir_glob*.png"], "no PNG/TIFF sections"),
    ]
    for src, needle in cases:
        assert main(["import", *src, f"{tmp_path}/o.zarr", "--voxel-size", "1", "1", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
    assert main(["info", f"{tmp_path}/nothing.zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing.zarr" in err and "\n" not in err
    # importing onto an existing volume needs --overwrite
    args = ["import", f"{tmp_path}/in.h5:raw", f"{tmp_path}/o.zarr", "--voxel-size", "1", "1", "1"]
    assert main(args) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_real_medulla_crop_to_zarr3_and_precomputed(shared_data, tmp_path):
    h5py = pytest.importorskip("h5py")
    path = shared_data / "flyem_fib_medulla_train" / "medulla_train.h5"
    crop = Box((20, 40, 60), (52, 104, 124))  # zyx
    with h5py.File(path, "r") as f:
        raw = f["raw"][crop.slices]
        gt = f["gt"][crop.slices]
    raw_zarr = import_volume(f"{path}:raw", f"zarr3://{tmp_path}/raw.zarr", voxel_size_xyz_nm=(10, 10, 10),
                             chunk_shape_zyx=(16, 32, 32), shard_shape_zyx=(32, 64, 64), crop=crop)
    gt_pc = import_volume(f"{path}:gt", f"precomputed://{tmp_path}/gt", voxel_size_xyz_nm=(10, 10, 10),
                          chunk_shape_zyx=(16, 32, 32), crop=crop)
    assert raw_zarr.kind == "image" and gt_pc.kind == "segmentation"
    np.testing.assert_array_equal(open_volume(f"{tmp_path}/raw.zarr").read(raw_zarr.bounds), raw)
    got = open_volume(f"precomputed://{tmp_path}/gt").read(gt_pc.bounds)
    np.testing.assert_array_equal(got, gt)
    assert len(np.unique(got)) > 5  # real neurons, not an empty crop
    info = json.loads((tmp_path / "gt" / "info").read_text())
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
