"""Every precomputed writer, read back with an independent reader.

Volumes, meshes, skeletons: cloud-volume. Annotations: neuroglancer's AnnotationReader plus cloud-volume's own
shard reader for the sharded indexes (TensorStore wrote them, so TensorStore reading them back would prove
little). Segment properties: checked field by field against segment_properties.md (no library reads them).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest

import viz_sample
from viz.annotations import AnnotationOptions, compressed_morton, write_synapse_annotations
from viz.meshes import mesh_labels, write_legacy_meshes
from viz.precomputed_volume import PyramidSpec, link_segmentation_extras, plan_scales, write_pyramid
from viz.publish import publish_layers
from viz.segment_properties import write_segment_properties
from viz.skeletons import write_skeletons
from storage.errors import ConnectomeError


@pytest.fixture(scope="module")
def sample():
    return viz_sample.make_volumes()


def _cv(path, mip=0):
    from cloudvolume import CloudVolume

    return CloudVolume(f"file://{path}", mip=mip, progress=False, fill_missing=True)


def test_plan_scales_makes_anisotropic_data_isotropic_first():
    assert plan_scales((512, 512, 64), (4, 4, 40), (64, 64, 64), None)[:4] == [(1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 1)]
    assert plan_scales((64, 64, 64), (8, 8, 8), (64, 64, 64), None) == [(1, 1, 1)]
    assert len(plan_scales((64, 64, 64), (8, 8, 8), (16, 16, 16), None)) == 3


@pytest.mark.parametrize("sharded", [False, True])
def test_segmentation_pyramid_reads_back_with_cloudvolume(tmp_path, sample, sharded):
    _, seg, _ = sample
    offset = (16, 8, 4)
    info = write_pyramid(tmp_path / "seg", seg, PyramidSpec("segmentation", (8, 8, 8), offset, (32, 32, 32),
                                                            sharded=sharded))
    assert info["type"] == "segmentation" and len(info["scales"]) == 2
    assert ("sharding" in info["scales"][0]) == sharded
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    vol = _cv(tmp_path / "seg")
    assert tuple(vol.voxel_offset) == offset
    back = np.asarray(vol[:, :, :])[..., 0].transpose(2, 1, 0)
    np.testing.assert_array_equal(back, seg)
    coarse = np.asarray(_cv(tmp_path / "seg", mip=1)[:, :, :])[..., 0].transpose(2, 1, 0)
    assert coarse.shape == (32, 32, 32)
    assert set(np.unique(coarse)) == set(np.unique(seg))  # mode downsampling never invents ids
    # a voxel well inside a cell keeps its id at the coarse scale
    z, y, x = viz_sample.CENTERS_ZYX[22]
    assert coarse[z // 2, y // 2, x // 2] == 22


def test_image_pyramid_is_mean_downsampled(tmp_path, sample):
    image, _, _ = sample
    write_pyramid(tmp_path / "raw", image, PyramidSpec("image", (8, 8, 8), chunk_size_xyz=(32, 32, 32)))
    np.testing.assert_array_equal(np.asarray(_cv(tmp_path / "raw")[:, :, :])[..., 0].transpose(2, 1, 0), image)
    coarse = np.asarray(_cv(tmp_path / "raw", mip=1)[:, :, :])[..., 0].transpose(2, 1, 0).astype(float)
    expect = image.astype(float).reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    assert np.abs(coarse - expect).max() <= 1.0


def test_jpeg_image_pyramid_is_smaller_and_close(tmp_path, sample):
    """JPEG EM (what large releases serve): every scale jpeg-encoded, read back by cloud-volume within JPEG's loss,
    and smaller than raw."""
    image, _, _ = sample
    for enc in ("raw", "jpeg"):
        write_pyramid(tmp_path / enc, image, PyramidSpec("image", (8, 8, 8), chunk_size_xyz=(32, 32, 32), encoding=enc))
    info = json.loads((tmp_path / "jpeg" / "info").read_text())
    assert len(info["scales"]) > 1 and {s["encoding"] for s in info["scales"]} == {"jpeg"}
    back = np.asarray(_cv(tmp_path / "jpeg")[:, :, :])[..., 0].transpose(2, 1, 0).astype(float)
    assert np.abs(back - image).mean() < 3.0
    coarse = np.asarray(_cv(tmp_path / "jpeg", mip=1)[:, :, :])[..., 0].transpose(2, 1, 0).astype(float)
    expect = image.astype(float).reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    assert np.abs(coarse - expect).mean() < 0.25 * expect.std()  # quality 75 on a busier, downsampled texture

    def size(d):
        return sum(f.stat().st_size for f in (tmp_path / d).rglob("*") if f.is_file())

    assert size("jpeg") < size("raw") / 2
    # a higher quality is kept at every scale and costs bytes for fidelity
    write_pyramid(tmp_path / "q95", image, PyramidSpec("image", (8, 8, 8), chunk_size_xyz=(32, 32, 32),
                                                       encoding="jpeg", jpeg_quality=95))
    info = json.loads((tmp_path / "q95" / "info").read_text())
    assert {s.get("jpeg_quality") for s in info["scales"]} == {95}
    fine = np.asarray(_cv(tmp_path / "q95")[:, :, :])[..., 0].transpose(2, 1, 0).astype(float)
    assert np.abs(fine - image).mean() < np.abs(back - image).mean() and size("q95") > size("jpeg")


def test_bad_pyramid_input_errors(tmp_path, sample):
    image, seg, _ = sample
    with pytest.raises(ConnectomeError, match="integer"):
        write_pyramid(tmp_path / "bad", image.astype(np.float32), PyramidSpec("segmentation", (8, 8, 8)))
    with pytest.raises(ConnectomeError, match="encoding"):
        PyramidSpec("segmentation", (8, 8, 8), encoding="jpeg")
    with pytest.raises(ConnectomeError, match="jpeg_quality"):
        write_pyramid(tmp_path / "q", image, PyramidSpec("image", (8, 8, 8), jpeg_quality=90))  # raw + quality
    with pytest.raises(ConnectomeError, match="3-d"):
        write_pyramid(tmp_path / "bad", image[0], PyramidSpec("image", (8, 8, 8)))


def test_meshes_read_back_with_cloudvolume(tmp_path, sample):
    _, seg, _ = sample
    write_pyramid(tmp_path / "seg", seg, PyramidSpec("segmentation", (8, 8, 8)))
    meshes = mesh_labels(seg, (8, 8, 8))
    assert sorted(meshes) == list(viz_sample.SEGMENTS)
    assert write_legacy_meshes(tmp_path / "seg" / "mesh", meshes) == 3
    link_segmentation_extras(tmp_path / "seg", mesh="mesh")
    vol = _cv(tmp_path / "seg")
    for sid in viz_sample.SEGMENTS:
        mesh = vol.mesh.get(sid)
        zyx = np.argwhere(seg == sid)
        lo_nm = zyx.min(0)[::-1] * 8.0
        hi_nm = (zyx.max(0)[::-1] + 1) * 8.0
        assert len(mesh.faces) > 50
        # the surface lies between voxel centres: within a voxel of the segment's box, never beyond it
        assert np.all(mesh.vertices.min(0) >= lo_nm - 1e-3) and np.all(mesh.vertices.min(0) <= lo_nm + 8)
        assert np.all(mesh.vertices.max(0) <= hi_nm + 1e-3) and np.all(mesh.vertices.max(0) >= hi_nm - 8)


@pytest.mark.parametrize("sharded", [False, True])
def test_skeletons_read_back_with_cloudvolume(tmp_path, sample, sharded):
    _, seg, _ = sample
    nodes = viz_sample.skeleton_nodes()
    write_pyramid(tmp_path / "seg", seg, PyramidSpec("segmentation", (8, 8, 8)))
    assert write_skeletons(tmp_path / "seg" / "skeletons", nodes, sharded=sharded) == 3
    link_segmentation_extras(tmp_path / "seg", skeletons="skeletons")
    info = json.loads((tmp_path / "seg" / "skeletons" / "info").read_text())
    assert [a["id"] for a in info["vertex_attributes"]] == ["radius", "compartment"]
    vol = _cv(tmp_path / "seg")
    for sid in viz_sample.SEGMENTS:
        skel = vol.skeleton.get(sid)
        rows = nodes[nodes.segment_id == sid].sort_values("node_id")
        np.testing.assert_allclose(skel.vertices, rows[["x_nm", "y_nm", "z_nm"]].to_numpy(float))
        np.testing.assert_allclose(skel.radius, rows["radius_nm"].to_numpy(float))
        names = info["compartment_names"]
        assert [names[int(c)] for c in skel.compartment] == rows["compartment"].tolist()
        assert len(skel.edges) == 4  # a chain of 5 nodes


def test_segment_properties_follow_the_spec(tmp_path, sample):
    _, seg, _ = sample
    table = viz_sample.segment_table(seg)
    write_segment_properties(tmp_path / "props", table)
    info = json.loads((tmp_path / "props" / "info").read_text())
    assert info["@type"] == "neuroglancer_segment_properties"
    inline = info["inline"]
    assert inline["ids"] == ["11", "22", "33"]
    props = {p["id"]: p for p in inline["properties"]}
    for p in inline["properties"]:
        assert len(p["values"]) == len(inline["ids"])
    assert sum(p["type"] == "label" for p in inline["properties"]) == 1
    assert sum(p["type"] == "tags" for p in inline["properties"]) == 1
    tags = props["cell_type"]
    assert tags["tags"] == ["Mi1_neuron", "T4"]  # no spaces, no '#'
    assert "description" not in tags and len(tags["tag_descriptions"]) == len(tags["tags"])
    assert tags["values"] == [[0], [1], [1]]
    assert props["label"]["values"] == ["cell 11", "cell 22", "cell 33"]
    assert props["voxel_count"]["data_type"] == "uint32"
    assert props["voxel_count"]["values"] == table.voxel_count.tolist()
    assert props["cell_type_confidence"]["data_type"] == "float32"
    assert props["synapses_out"]["values"] == [1, 1, 1]
    with pytest.raises(ConnectomeError, match="segment_id"):
        write_segment_properties(tmp_path / "bad", pd.DataFrame({"label": ["x"]}))


def _random_synapses(n: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(dict(
        synapse_id=rng.permutation(np.arange(1, n + 1)) * 7,
        x_nm=rng.integers(0, 4000, n), y_nm=rng.integers(0, 3000, n), z_nm=rng.integers(0, 500, n),
        pre_segment_id=rng.integers(1, 40, n), post_segment_id=rng.integers(0, 40, n),
        score=rng.random(n).astype(np.float32), size_voxels=rng.integers(1, 1000, n),
    ))
    for axis in "xyz":
        df[f"pre_{axis}_nm"] = df[f"{axis}_nm"] - 20
        df[f"post_{axis}_nm"] = df[f"{axis}_nm"] + 20
    return df


@pytest.mark.parametrize("sharded", [False, True])
def test_synapse_annotations_read_back(tmp_path, sharded):
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    syn = _random_synapses(1200)
    info = write_synapse_annotations(tmp_path / "syn", syn, AnnotationOptions(limit=60, sharded=sharded))
    assert info["annotation_type"] == "LINE"
    assert [r["id"] for r in info["relationships"]] == ["pre_segment", "post_segment"]
    assert len(info["spatial"]) >= 3  # 1200 annotations at <= ~60 per cell need several levels
    for coarse, fine in zip(info["spatial"], info["spatial"][1:]):
        ratio = np.array(coarse["chunk_size"]) / np.array(fine["chunk_size"])
        assert set(ratio.round(6)) <= {1.0, 2.0}
        np.testing.assert_allclose(np.array(fine["grid_shape"]) * fine["chunk_size"],
                                   np.array(info["upper_bound"]) - info["lower_bound"])
    reader = AnnotationReader(f"file://{tmp_path / 'syn'}/")
    by_id = syn.set_index("synapse_id")
    for sid in by_id.index[:25]:
        ann = reader.by_id[int(sid)]
        row = by_id.loc[sid]
        np.testing.assert_allclose(ann.point_a, row[["pre_x_nm", "pre_y_nm", "pre_z_nm"]].to_numpy(float))
        np.testing.assert_allclose(ann.point_b, row[["post_x_nm", "post_y_nm", "post_z_nm"]].to_numpy(float))
        assert ann.props[0] == pytest.approx(row.score) and int(ann.props[1]) == row.size_voxels
        assert [list(map(int, s)) for s in ann.segments] == [
            [row.pre_segment_id], [row.post_segment_id] if row.post_segment_id else []]
    for seg_id in (1, 17):
        got = {int(a.id) for a in reader.relationships["pre_segment"][seg_id]}
        assert got == set(syn.synapse_id[syn.pre_segment_id == seg_id].tolist())
    assert 0 not in reader.relationships["post_segment"]
    # the spatial index holds every annotation, and the coarse level is a subsample within the limit
    all_ids = {int(a.id) for a in reader.get_within_spatial_bounds()}
    assert all_ids == set(syn.synapse_id.tolist())
    level0 = reader.spatial[0][(0, 0, 0)]
    assert 0 < len(level0) <= 60 * 1.3
    # every annotation listed in a cell touches that cell (neuroglancer's own box filter is unusable:
    # its _bbox_check_bounds compares max <= lower), and each appears at exactly one level
    lower = np.array(info["lower_bound"])
    level_of: dict[int, int] = {}
    for level, meta in enumerate(info["spatial"]):
        chunk = np.array(meta["chunk_size"])
        for cell in np.ndindex(*meta["grid_shape"]):
            if cell not in reader.spatial[level]:
                continue
            lo, hi = lower + np.array(cell) * chunk, lower + (np.array(cell) + 1) * chunk
            for ann in reader.spatial[level][cell]:
                a, b = np.asarray(ann.point_a), np.asarray(ann.point_b)
                assert np.all(np.minimum(a, b) <= hi) and np.all(np.maximum(a, b) >= lo)
                assert level_of.setdefault(int(ann.id), level) == level
    assert len(level_of) == len(syn)
    if sharded:
        _check_sharded_with_cloudvolume(tmp_path / "syn", info, syn)


def _check_sharded_with_cloudvolume(path, info, syn):
    """cloud-volume's own shard reader (not TensorStore) finds every by_id and spatial entry."""
    from cloudvolume.datasource.precomputed.annotation import PrecomputedAnnotationSource
    from cloudvolume.datasource.precomputed.sharding import ShardReader, ShardingSpecification

    cache = PrecomputedAnnotationSource(f"file://{path}").cache
    spec = ShardingSpecification.from_dict(info["by_id"]["sharding"])
    reader = ShardReader(f"file://{path}", cache, spec)
    listed = np.concatenate([reader.list_labels(f.name, path="by_id") for f in (path / "by_id").glob("*.shard")])
    assert sorted(listed.tolist()) == sorted(syn.synapse_id.tolist())
    ids = syn.synapse_id.to_numpy()[:40].tolist()
    data = reader.get_data(ids, path="by_id")
    for sid in ids:
        record = data[sid]
        row = syn[syn.synapse_id == sid].iloc[0]
        geom = np.frombuffer(record[:24], "<f4")
        np.testing.assert_allclose(geom[:3], [row.pre_x_nm, row.pre_y_nm, row.pre_z_nm])
        (n_pre,) = struct.unpack("<I", record[32:36])
        assert n_pre == 1 and struct.unpack("<Q", record[36:44])[0] == row.pre_segment_id
    level = info["spatial"][-1]
    spec = ShardingSpecification.from_dict(level["sharding"])
    grid = np.array(level["grid_shape"])
    cells = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    codes = compressed_morton(cells, grid)
    got = ShardReader(f"file://{path}", cache, spec).get_data(codes.tolist(), path=level["key"])
    assert any(v is not None for v in got.values())
    from cloudvolume.datasource.precomputed.common import compressed_morton_code

    np.testing.assert_array_equal(compressed_morton_code(cells, grid), codes)


def test_publish_layers_writes_a_complete_run(tmp_path, sample):
    image, seg, frag = sample
    report = publish_layers(
        tmp_path / "run", voxel_size_xyz_nm=(8, 8, 8), image=image, segmentation=seg, fragments=frag,
        skeleton_nodes=viz_sample.skeleton_nodes(), segments=viz_sample.segment_table(seg),
        synapses=viz_sample.synapses(), version=1,
    )
    assert set(report["layers"]) == {"raw", "fragments", "segmentation", "mesh", "skeletons", "segment_properties",
                                     "synapses"}
    assert report["meshes"] == 3 and report["skeletons"] == 3 and report["synapses"] == 3
    seg_info = json.loads((tmp_path / "run" / "segmentation" / "info").read_text())
    assert (seg_info["mesh"], seg_info["skeletons"], seg_info["segment_properties"]) == (
        "mesh", "skeletons", "segment_properties")
    assert json.loads((tmp_path / "run" / "publish.json").read_text())["version"] == 1
    vol = _cv(tmp_path / "run" / "fragments")
    assert set(np.unique(vol[:, :, :])) == {0, *viz_sample.FRAGMENTS}


def _area(v, f):
    v = np.asarray(v, float)
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()


def test_cutting_meshes_at_grid_planes_keeps_the_surface(sample):
    from viz.multires_meshes import cut_to_grid, split_by_plane

    v, f = split_by_plane(np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0.0]]), np.array([[0, 1, 2]]), 0, 1.0)
    assert len(f) == 3 and _area(v, f) == pytest.approx(2.0)
    assert np.all((v[f][..., 0].max(1) <= 1.0) | (v[f][..., 0].min(1) >= 1.0))  # no triangle crosses x=1
    _, seg, _ = sample
    mesh = mesh_labels(seg, (8, 8, 8))[22]
    v, f = cut_to_grid(mesh.vertices, mesh.faces, np.zeros(3), np.full(3, 64.0))
    assert len(f) > len(mesh.faces) and _area(v, f) == pytest.approx(_area(mesh.vertices, mesh.faces), rel=1e-9)
    cells = np.floor(v[f] / 64.0 + 1e-9)
    lo, hi = np.floor(v[f].min(1) / 64 + 1e-9), np.ceil(v[f].max(1) / 64 - 1e-9)
    assert np.all(hi - lo <= 1), "a triangle spans more than one grid cell"
    assert cells.shape[0] == len(f)


@pytest.mark.parametrize("sharded", [False, True])
def test_multires_meshes_read_back_with_cloudvolume(tmp_path, sample, sharded):
    from viz.multires_meshes import MultiresOptions, write_multires_meshes

    _, seg, _ = sample
    write_pyramid(tmp_path / "seg", seg, PyramidSpec("segmentation", (8, 8, 8)))
    meshes = mesh_labels(seg, (8, 8, 8))
    assert write_multires_meshes(tmp_path / "seg" / "mesh", meshes, (8, 8, 8),
                                 options=MultiresOptions(chunk_voxels=16), sharded=sharded) == 3
    info = json.loads((tmp_path / "seg" / "mesh" / "info").read_text())
    assert info["@type"] == "neuroglancer_multilod_draco" and ("sharding" in info) == sharded
    link_segmentation_extras(tmp_path / "seg", mesh="mesh")
    vol = _cv(tmp_path / "seg")
    for sid in viz_sample.SEGMENTS:
        original = meshes[sid]
        fine = vol.mesh.get(sid, lod=0)
        fine = fine[sid] if isinstance(fine, dict) else fine
        step = 16 * 8 / (2**16 - 1)  # LOD-0 node edge / quantization levels
        np.testing.assert_allclose(fine.vertices.min(0), original.vertices.min(0), atol=step)
        np.testing.assert_allclose(fine.vertices.max(0), original.vertices.max(0), atol=step)
        assert _area(fine.vertices, fine.faces) == pytest.approx(_area(original.vertices, original.faces), rel=1e-3)
        coarse = vol.mesh.get(sid, lod=2)
        coarse = coarse[sid] if isinstance(coarse, dict) else coarse
        assert 0 < len(coarse.faces) < len(fine.faces)


def test_spatial_index_terminates_when_annotations_pile_up_at_one_spot(tmp_path):
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    syn = _random_synapses(400)
    for col in [c for c in syn.columns if c.endswith("_nm")]:
        syn[col] = 100  # every synapse at the same point: no grid refinement ever separates them
    info = write_synapse_annotations(tmp_path / "syn", syn, AnnotationOptions(limit=10))
    assert len(info["spatial"]) <= 16
    reader = AnnotationReader(f"file://{tmp_path / 'syn'}/")
    assert {int(a.id) for a in reader.get_within_spatial_bounds()} == set(syn.synapse_id.tolist())
