"""Volumes: round trips of every format and local kvstore, metadata travelling, URL parsing, bad input errors."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import tensorstore as ts

from storage.box import Box
from storage.errors import VolumeError
from storage.urls import parse_url
from storage.volume import create_volume, open_volume, precomputed_sharding

FORMATS = {
    "zarr": "zarr://{base}/v.zarr",
    "zarr3": "{base}/v.zarr",
    "zarr3_sharded": "zarr3://{base}/vs.zarr",
    "n5": "{base}/v.n5",
    "precomputed": "precomputed://{base}/v",
    "precomputed_sharded": "precomputed://{base}/vs",
}
SHAPE = (12, 20, 24)  # zyx
OFFSET = (3, 5, 7)  # xyz


def _url(fmt: str, kvstore: str, tmp_path) -> str:
    base = f"file://{tmp_path}" if kvstore == "file" else f"memory://{uuid.uuid4().hex}"
    return FORMATS[fmt].format(base=base)


def _data(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "float32":
        return rng.random(SHAPE, dtype=np.float32)
    return rng.integers(0, 2**8 if dtype == "uint8" else 2**63, SHAPE, dtype=dtype, endpoint=False)


@pytest.mark.parametrize("kvstore", ["file", "memory"])
@pytest.mark.parametrize("dtype", ["uint8", "uint64", "float32"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip(fmt, kvstore, dtype, tmp_path):
    url = _url(fmt, kvstore, tmp_path)
    sharded = fmt.endswith("sharded")
    kind = "segmentation" if dtype == "uint64" else "image"
    vol = create_volume(url, shape_zyx=SHAPE, dtype=dtype, voxel_size_xyz_nm=(4, 5, 40), chunk_shape_zyx=(4, 8, 8),
                        shard_shape_zyx=(8, 16, 16) if sharded else None, kind=kind, voxel_offset_xyz=OFFSET)
    data = _data(dtype)
    # write in two halves along z so partial-shard writes are exercised too
    b = vol.bounds
    assert b.start == tuple(reversed(OFFSET)) and b.shape == SHAPE
    mid = b.start[0] + 5
    vol.write(Box(b.start, (mid, b.stop[1], b.stop[2])), data[:5])
    vol.write(Box((mid, b.start[1], b.start[2]), b.stop), data[5:])
    again = open_volume(url)
    assert again.shape == SHAPE and again.dtype == np.dtype(dtype)
    assert again.voxel_size == (4.0, 5.0, 40.0) and again.voxel_offset == OFFSET
    np.testing.assert_array_equal(again.read(again.bounds), data)
    inner = Box.from_shape((3, 4, 5), (b.start[0] + 2, b.start[1] + 3, b.start[2] + 4))
    np.testing.assert_array_equal(again.read(inner), data[2:5, 3:7, 4:9])
    # cheap to re-open from its JSON spec (as a Dask worker does)
    spec = json.loads(json.dumps(again.spec))
    worker = open_volume(spec)
    assert worker.voxel_size == again.voxel_size and worker.bounds == again.bounds and worker.kind == kind
    np.testing.assert_array_equal(worker.read(inner), data[2:5, 3:7, 4:9])
    if sharded:
        assert again.chunk_shape == (8, 16, 16) and again.read_chunk_shape == (4, 8, 8)
    else:
        assert again.chunk_shape == (4, 8, 8)


def test_open_accepts_tensorstore_spec(tmp_path):
    path = tmp_path / "plain"
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
             "metadata": {"shape": [4, 5, 6], "data_type": "uint16"}, "create": True}).result()
    vol = open_volume({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, mode="r+")
    vol.write(vol.bounds, np.full((4, 5, 6), 7, np.uint16))
    assert open_volume(f"zarr3://{path}").read(Box.from_shape((4, 5, 6))).sum() == 7 * 120
    assert vol.voxel_size == (1.0, 1.0, 1.0) and vol.voxel_offset == (0, 0, 0)


@pytest.mark.parametrize("url, driver, kvstore", [
    ("gs://bucket/em/raw", None, {"driver": "gcs", "bucket": "bucket", "path": "em/raw/"}),
    ("precomputed://gs://bucket/x", "neuroglancer_precomputed", {"driver": "gcs", "bucket": "bucket", "path": "x/"}),
    ("s3://bucket/a/b.zarr", "zarr3", {"driver": "s3", "bucket": "bucket", "path": "a/b.zarr/"}),
    ("zarr://s3://bucket/a/b", "zarr", {"driver": "s3", "bucket": "bucket", "path": "a/b/"}),
    ("zarr3://gs://bucket/c", "zarr3", {"driver": "gcs", "bucket": "bucket", "path": "c/"}),
    ("n5://https://host.org/data/v.n5", "n5", {"driver": "http", "base_url": "https://host.org", "path": "/data/v.n5/"}),
    ("precomputed://http://127.0.0.1:8000/seg", "neuroglancer_precomputed",
     {"driver": "http", "base_url": "http://127.0.0.1:8000", "path": "/seg/"}),
    ("gs://bucket/x|zarr3:", "zarr3", {"driver": "gcs", "bucket": "bucket", "path": "x/"}),
    ("memory://scratch/v.zarr", "zarr3", {"driver": "memory", "path": "scratch/v.zarr/"}),
    ("file:///data/v.n5", "n5", {"driver": "file", "path": "/data/v.n5/"}),
    ("/data/v.zarr", "zarr3", {"driver": "file", "path": "/data/v.zarr/"}),
])
def test_url_parsing(url, driver, kvstore):
    parsed = parse_url(url)
    assert parsed.format == driver and parsed.kvstore == kvstore
    if driver:
        spec = parsed.tensorstore_spec()
        assert spec == {"driver": driver, "kvstore": kvstore}
        ts.Spec(spec)  # TensorStore accepts it (parsing only, no network)


def test_relative_path_is_file_kvstore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_url("out/seg.zarr").kvstore == {"driver": "file", "path": f"{tmp_path}/out/seg.zarr/"}


def test_zarr_python_sees_ome_ngff(tmp_path):
    zarr = pytest.importorskip("zarr")
    vol = create_volume(str(tmp_path / "img.zarr"), shape_zyx=(8, 16, 16), dtype="uint8",
                        voxel_size_xyz_nm=(8, 8, 40), chunk_shape_zyx=(4, 8, 8), shard_shape_zyx=(8, 16, 16),
                        voxel_offset_xyz=(2, 0, 1))
    data = np.arange(8 * 16 * 16, dtype=np.uint8).reshape(8, 16, 16)
    vol.write(vol.bounds, data)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    transforms = ms["datasets"][0]["coordinateTransformations"]
    assert transforms[0] == {"type": "scale", "scale": [40.0, 8.0, 8.0]}
    assert transforms[1] == {"type": "translation", "translation": [40.0, 0.0, 16.0]}
    np.testing.assert_array_equal(group[ms["datasets"][0]["path"]][:], data)
    # zarr v2 output carries NGFF 0.4
    create_volume(f"zarr://{tmp_path}/v2.zarr", shape_zyx=(4, 4, 4), dtype="uint8", voxel_size_xyz_nm=(1, 2, 3),
                  chunk_shape_zyx=(4, 4, 4))
    g2 = zarr.open_group(str(tmp_path / "v2.zarr"), mode="r")
    assert g2.attrs["multiscales"][0]["version"] == "0.4"
    assert g2.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [3.0, 2.0, 1.0]


def test_n5_attributes(tmp_path):
    create_volume(f"{tmp_path}/v.n5", shape_zyx=(4, 6, 8), dtype="uint16", voxel_size_xyz_nm=(4, 5, 6),
                  chunk_shape_zyx=(4, 4, 4))
    attrs = json.loads((tmp_path / "v.n5" / "s0" / "attributes.json").read_text())
    assert attrs["dimensions"] == [8, 6, 4]  # n5 lists x, y, z
    assert attrs["resolution"] == [4.0, 5.0, 6.0]
    assert attrs["pixelResolution"] == {"unit": "nm", "dimensions": [4.0, 5.0, 6.0]}


@pytest.mark.parametrize("variant", ["raw", "compressed_segmentation", "sharded"])
def test_cloudvolume_reads_our_precomputed(variant, tmp_path):
    cloudvolume = pytest.importorskip("cloudvolume")
    kind = "image" if variant == "raw" else "segmentation"
    dtype = np.uint8 if variant == "raw" else np.uint64
    vol = create_volume(f"precomputed://{tmp_path}/pc", shape_zyx=(16, 32, 32), dtype=dtype,
                        voxel_size_xyz_nm=(8, 8, 40), chunk_shape_zyx=(8, 16, 16), kind=kind,
                        shard_shape_zyx=(16, 32, 32) if variant == "sharded" else None, voxel_offset_xyz=(10, 20, 30))
    data = np.random.default_rng(1).integers(0, 200, (16, 32, 32)).astype(dtype)
    vol.write(vol.bounds, data)
    info = json.loads((tmp_path / "pc" / "info").read_text())
    scale = info["scales"][0]
    assert scale["encoding"] == ("raw" if variant == "raw" else "compressed_segmentation")
    assert ("sharding" in scale) == (variant == "sharded")
    assert scale["resolution"] == [8, 8, 40] and scale["voxel_offset"] == [10, 20, 30]
    cv = cloudvolume.CloudVolume(f"file://{tmp_path}/pc", progress=False)
    xyzc = np.asarray(cv[10:42, 20:52, 30:46])
    np.testing.assert_array_equal(xyzc[..., 0].transpose(2, 1, 0), data)


def test_sharding_params_make_one_shard_per_write_box():
    params = precomputed_sharding([256, 256, 128], [64, 64, 32], [128, 128, 64])
    assert params["preshift_bits"] + params["minishard_bits"] == 3
    assert params["shard_bits"] == 6 - 3
    with pytest.raises(VolumeError, match="Morton"):
        precomputed_sharding([256, 256, 128], [64, 64, 32], [64, 64, 64])


def test_at_scale_and_scale_argument(tmp_path):
    from storage.pyramid import add_scales

    vol = create_volume(f"{tmp_path}/m.zarr", shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(4, 4, 4),
                        chunk_shape_zyx=(4, 4, 4))
    add_scales(vol, [(2, 2, 2)])
    assert open_volume(f"{tmp_path}/m.zarr", scale=1).voxel_size == (8.0, 8.0, 8.0)
    assert open_volume(f"{tmp_path}/m.zarr").at_scale(1).shape == (4, 4, 4)
    with pytest.raises(VolumeError, match="scale 5 does not exist"):
        open_volume(f"{tmp_path}/m.zarr", scale=5)


# ------------------------------------------------------------------------------------------------ bad input
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_path_error(tmp_path):
    with pytest.raises(VolumeError) as exc:
        open_volume(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in _one_line(exc)
    with pytest.raises(VolumeError) as exc:
        open_volume(f"precomputed://{tmp_path}/nowhere")
    assert "nowhere" in _one_line(exc)


@pytest.fixture()
def small(tmp_path):
    vol = create_volume(f"{tmp_path}/s.zarr", shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(1, 1, 1),
                        chunk_shape_zyx=(4, 4, 4))
    vol.write(vol.bounds, np.ones((8, 8, 8), np.uint8))
    return vol


def test_dtype_mismatch_error(small):
    with pytest.raises(VolumeError) as exc:
        small.write(small.bounds, np.ones((8, 8, 8), np.float32))
    msg = _one_line(exc)
    assert "float32" in msg and "uint8" in msg and "s.zarr" in msg


def test_box_outside_error(small):
    with pytest.raises(VolumeError) as exc:
        small.read(Box((0, 0, 0), (9, 8, 8)))
    msg = _one_line(exc)
    assert "outside" in msg and "s.zarr" in msg and "[0,0,0 : 8,8,9) (xyz)" in msg
    with pytest.raises(VolumeError):
        small.write(Box((-1, 0, 0), (3, 4, 4)), np.zeros((4, 4, 4), np.uint8))


def test_shape_mismatch_and_read_only_errors(small, tmp_path):
    with pytest.raises(VolumeError, match="does not match box"):
        small.write(Box.from_shape((4, 4, 4)), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(VolumeError, match="read-only"):
        open_volume(f"{tmp_path}/s.zarr").write(Box.from_shape((4, 4, 4)), np.zeros((4, 4, 4), np.uint8))


def test_existing_volume_not_overwritten(small, tmp_path):
    with pytest.raises(VolumeError, match="already exists"):
        create_volume(f"{tmp_path}/s.zarr", shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(1, 1, 1),
                      chunk_shape_zyx=(4, 4, 4))
    fresh = create_volume(f"{tmp_path}/s.zarr", shape_zyx=(4, 4, 4), dtype="uint16", voxel_size_xyz_nm=(1, 1, 1),
                          chunk_shape_zyx=(4, 4, 4), delete_existing=True)
    assert fresh.shape == (4, 4, 4) and fresh.dtype == np.uint16


@pytest.mark.parametrize("fmt", ["zarr3", "zarr3_sharded", "precomputed"])
def test_corrupt_chunk_error_names_volume_and_chunk(fmt, tmp_path):
    url = _url(fmt, "file", tmp_path)
    vol = create_volume(url, shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(1, 1, 1),
                        chunk_shape_zyx=(4, 4, 4), shard_shape_zyx=(8, 8, 8) if "sharded" in fmt else None)
    vol.write(vol.bounds, np.ones((8, 8, 8), np.uint8))
    root = tmp_path / ("vs.zarr" if "sharded" in fmt else "v.zarr" if fmt == "zarr3" else "v")
    chunk_files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("zarr.json", "info"))
    victim = chunk_files[0]
    victim.write_bytes(b"this is not a chunk" * 3)
    with pytest.raises(VolumeError) as exc:
        open_volume(url).read(open_volume(url).bounds)
    msg = _one_line(exc)
    assert str(root) in msg and victim.name in msg


def test_missing_chunk_error_or_zeros(tmp_path):
    url = f"{tmp_path}/m.zarr"
    vol = create_volume(url, shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(1, 1, 1),
                        chunk_shape_zyx=(4, 4, 4))
    vol.write(Box.from_shape((4, 8, 8)), np.full((4, 8, 8), 3, np.uint8))  # z 4..8 never written
    with pytest.raises(VolumeError) as exc:
        open_volume(url).read(Box((4, 0, 0), (8, 4, 4)))
    msg = _one_line(exc)
    assert "m.zarr" in msg and "c/1/0/0" in msg and "missing" in msg
    filled = open_volume(url, fill_missing=True).read(Box((0, 0, 0), (8, 4, 4)))
    assert (filled[:4] == 3).all() and (filled[4:] == 0).all()
    # an all-zero chunk that was written is data, not missing
    vol.write(Box((4, 0, 0), (8, 4, 4)), np.zeros((4, 4, 4), np.uint8))
    assert open_volume(url).read(Box((4, 0, 0), (8, 4, 4))).sum() == 0


def test_unknown_scheme_and_format_errors(tmp_path):
    with pytest.raises(VolumeError, match="unknown URL scheme"):
        parse_url("ftp://host/x")
    with pytest.raises(VolumeError, match="unknown volume format"):
        create_volume(f"{tmp_path}/x", shape_zyx=(1, 1, 1), dtype="uint8", voxel_size_xyz_nm=(1, 1, 1),
                      chunk_shape_zyx=(1, 1, 1), format="tiff")
    with pytest.raises(VolumeError, match="voxel_size_xyz_nm"):
        create_volume(f"{tmp_path}/y.zarr", shape_zyx=(1, 1, 1), dtype="uint8", voxel_size_xyz_nm=(1, 0, 1),
                      chunk_shape_zyx=(1, 1, 1))
    assert not os.path.exists(tmp_path / "y.zarr")


def test_volume_pickles_as_its_spec(small):
    import pickle

    clone = pickle.loads(pickle.dumps(small))
    assert clone.spec == small.spec and clone.mode == small.mode and clone.bounds == small.bounds
    np.testing.assert_array_equal(clone.read(clone.bounds), small.read(small.bounds))


def test_http_kvstore_reads_local_server(tmp_path):
    """http(s) volumes are read-only: serve a directory locally and read zarr3 and precomputed through http://."""
    import functools
    import http.server
    import threading

    data = np.arange(8 * 8 * 8, dtype=np.uint8).reshape(8, 8, 8)
    for url in (f"{tmp_path}/h.zarr", f"precomputed://{tmp_path}/hp"):
        vol = create_volume(url, shape_zyx=(8, 8, 8), dtype="uint8", voxel_size_xyz_nm=(2, 3, 4),
                            chunk_shape_zyx=(4, 4, 4))
        vol.write(vol.bounds, data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for url in (f"zarr3://{base}/h.zarr", f"precomputed://{base}/hp"):
            vol = open_volume(url)
            assert vol.voxel_size == (2.0, 3.0, 4.0)
            np.testing.assert_array_equal(vol.read(vol.bounds), data)
    finally:
        server.shutdown()
        server.server_close()


def test_format_detected_from_metadata(tmp_path):
    """Plain paths/URLs (as CloudVolume users paste them) and `zarr://` find the format from its metadata files."""
    made = {
        "neuroglancer_precomputed": create_volume(f"precomputed://{tmp_path}/a", shape_zyx=(4, 4, 4), dtype="uint8",
                                                  voxel_size_xyz_nm=(1, 1, 1), chunk_shape_zyx=(4, 4, 4)),
        "zarr3": create_volume(f"zarr3://{tmp_path}/b", shape_zyx=(4, 4, 4), dtype="uint8",
                               voxel_size_xyz_nm=(1, 1, 1), chunk_shape_zyx=(4, 4, 4)),
        "zarr": create_volume(f"zarr://{tmp_path}/c", shape_zyx=(4, 4, 4), dtype="uint8",
                              voxel_size_xyz_nm=(1, 1, 1), chunk_shape_zyx=(4, 4, 4)),
        "n5": create_volume(f"n5://{tmp_path}/d", shape_zyx=(4, 4, 4), dtype="uint8",
                            voxel_size_xyz_nm=(1, 1, 1), chunk_shape_zyx=(4, 4, 4)),
    }
    for fmt, vol in made.items():
        path = vol.name
        assert open_volume(path).format == fmt
        assert open_volume(f"file://{path}").format == fmt
    assert open_volume(f"zarr://{tmp_path}/b").format == "zarr3"  # zarr:// reads v2 or v3
    assert open_volume(f"zarr://{tmp_path}/c").format == "zarr"
    with pytest.raises(VolumeError, match="no zarr volume"):
        open_volume(f"zarr://{tmp_path}/a")
    pc = open_volume({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/a", "scale_index": 0})
    assert pc.shape == (4, 4, 4)
