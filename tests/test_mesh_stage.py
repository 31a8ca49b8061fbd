"""Blockwise meshing on a real Dask cluster: the fragments of a segment tile the surface the whole-volume mesh has."""

from __future__ import annotations

import json

import numpy as np
from cloudvolume import CloudVolume

VOXEL_XYZ = (8.0, 8.0, 16.0)


def _segmentation() -> np.ndarray:
    """Three objects that cross block faces: a ball, a slab and a tube along x, plus a one-block cube."""
    z, y, x = np.mgrid[:32, :64, :96]
    seg = np.zeros((32, 64, 96), np.uint64)
    seg[(z - 16) ** 2 * 4 + (y - 30) ** 2 + (x - 48) ** 2 < 18 ** 2] = 7
    seg[3:9, 5:60, 10:90] = 8
    seg[(z - 24) ** 2 * 4 + (y - 52) ** 2 < 25] = 9
    seg[20:28, 2:10, 2:10] = 10
    return seg


def _write(tmp_path, seg: np.ndarray) -> str:
    from storage.volume import create_volume

    v = create_volume(str(tmp_path / "seg"), shape_zyx=seg.shape, dtype=seg.dtype, voxel_size_xyz_nm=VOXEL_XYZ,
                      chunk_shape_zyx=(16, 32, 32), kind="segmentation", format="precomputed")
    v.write(v.bounds, seg)
    return "precomputed://" + str(tmp_path / "seg")


def _area(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())


def test_blockwise_meshes_tile_the_whole_volume_surface_and_resume(tmp_path):
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.stages.mesh import run_mesh
    from viz.meshes import MeshOptions, mesh_labels

    seg = _segmentation()
    url = _write(tmp_path, seg)
    mesh_dir = tmp_path / "mesh"
    options = MeshOptions(reduction_factor=0)  # no simplification: surfaces comparable triangle for triangle
    with open_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as client:
        out = run_mesh(url, str(mesh_dir), tmp_path / "work", client=client, block_shape_zyx=(16, 32, 32),
                       options=options, progress=False)
        assert out["blocks"] == 2 * 2 * 3 and out["segments"] == 4
        # a segment in several blocks has a fragment per block, all in its manifest
        manifest = json.loads((mesh_dir / "7:0").read_text())["fragments"]
        assert len(manifest) == 12 and all((mesh_dir / f).is_file() for f in manifest)
        assert len(json.loads((mesh_dir / "10:0").read_text())["fragments"]) == 1

        # resume: a rerun finds every block in the ledger and rewrites only the manifests
        before = {p.name: p.stat().st_mtime_ns for p in mesh_dir.glob("*:0:*")}
        again = run_mesh(url, str(mesh_dir), tmp_path / "work", client=client, block_shape_zyx=(16, 32, 32),
                         options=options, progress=False)
        assert again == out
        assert {p.name: p.stat().st_mtime_ns for p in mesh_dir.glob("*:0:*")} == before

    whole = mesh_labels(seg, VOXEL_XYZ, options=options)
    for sid, ref in whole.items():
        frags = json.loads((mesh_dir / f"{sid}:0").read_text())["fragments"]
        area = 0.0
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for name in frags:
            data = (mesh_dir / name).read_bytes()
            n = int(np.frombuffer(data[:4], np.uint32)[0])
            verts = np.frombuffer(data[4:4 + 12 * n], np.float32).reshape(n, 3)
            faces = np.frombuffer(data[4 + 12 * n:], np.uint32).reshape(-1, 3)
            area += _area(verts, faces)
            lo, hi = np.minimum(lo, verts.min(0)), np.maximum(hi, verts.max(0))
        np.testing.assert_allclose(area, _area(ref.vertices, ref.faces), rtol=1e-4, err_msg=f"segment {sid}")
        np.testing.assert_allclose(lo, ref.vertices.min(0), atol=1e-3)
        np.testing.assert_allclose(hi, ref.vertices.max(0), atol=1e-3)


def test_publish_meshes_a_large_segmentation_blockwise(tmp_path):
    """Above `mesh_in_memory_voxels` publish meshes from RUN/segmentation blockwise; Neuroglancer's reader (here
    cloud-volume's) fuses each segment's fragments."""
    from viz.publish import PublishOptions, publish_layers

    seg = _segmentation()
    run = tmp_path / "run"
    opts = PublishOptions(chunk_size_xyz=(32, 32, 16), mesh_in_memory_voxels=0, mesh_block_shape_zyx=(16, 32, 32))
    report = publish_layers(run, voxel_size_xyz_nm=VOXEL_XYZ, segmentation=seg, options=opts)
    assert report["meshes"] == 4
    assert len(list((run / "work" / "mesh" / "mesh_pieces").glob("block_*.npy"))) == 12
    vol = CloudVolume(f"file://{run}/segmentation", progress=False)
    mesh = vol.mesh.get(7)
    ball = np.argwhere(seg == 7)[:, ::-1] * np.asarray(VOXEL_XYZ)  # xyz nm of voxel corners
    assert mesh.vertices.shape[0] > 100
    vs = np.asarray(VOXEL_XYZ)  # simplification may move a vertex by up to a voxel (zmesh's default max_error)
    assert np.all(mesh.vertices.min(0) >= ball.min(0) - vs) and np.all(mesh.vertices.max(0) <= ball.max(0) + 2 * vs)
    # fused from several blocks: the ball spans more than one 32-voxel block in x and y
    assert np.all(mesh.vertices.max(0)[:2] - mesh.vertices.min(0)[:2] > 32 * np.asarray(VOXEL_XYZ[:2]))
