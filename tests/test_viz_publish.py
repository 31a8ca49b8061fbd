"""Publishing a run from the store: after a merge, the republished layers show the merged cell."""

from __future__ import annotations

import json

import numpy as np
from cloudvolume import CloudVolume

import viz_sample
from viz.publish import STORE, publish_layers


def test_publish_command_republishes_the_run_at_the_latest_store_version(tmp_path, capsys):
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    from pipeline.cli import main

    run = tmp_path / "run"
    image, seg, frag = viz_sample.make_volumes()
    publish_layers(run, voxel_size_xyz_nm=viz_sample.VOXEL_SIZE_XYZ, image=image, fragments=frag, version=1)
    with viz_sample.make_store(run / STORE, seg, frag) as store:
        merged = store.merge(11, 22, user="test")
    new = merged.segments_after[0]

    assert main(["publish", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["version"] == merged.version and report["synapses"] == 2  # 11->22 became an autapse
    assert {"segmentation", "mesh", "skeletons", "segment_properties", "synapses"} <= set(report["layers"])
    assert "fragments" not in report["layers"]  # RUN/fragments was the input: read, not rewritten

    vol = CloudVolume(f"file://{run}/segmentation", progress=False, fill_missing=True)
    published = np.asarray(vol[:, :, :])[..., 0].transpose(2, 1, 0)
    expected = np.where(np.isin(seg, [11, 22]), new, seg)
    np.testing.assert_array_equal(published, expected)
    assert vol.mesh.get(new).vertices.shape[0] > 0
    props = json.loads((run / "segmentation" / "segment_properties" / "info").read_text())["inline"]
    assert props["ids"] == ["33", str(new)]
    by_id = {p["id"]: p for p in props["properties"]}
    assert by_id["synapses_out"]["values"] == [1, 1] and by_id["voxel_count"]["values"][1] == int(np.isin(seg, [11, 22]).sum())
    reader = AnnotationReader(f"file://{run}/synapses/")
    assert sorted(int(a.id) for a in reader.relationships["pre_segment"][new]) == [2]
    assert json.loads((run / "publish.json").read_text())["version"] == merged.version
    skel = json.loads((run / "publish.json").read_text())["skeletons"]
    assert skel == 2  # cell 33 and the merged cell, which carries the skeletons of 11 and 22
    with viz_sample.make_store(tmp_path / "check.duckdb", seg, frag) as fresh:
        parts = len(fresh.skeleton(11)) + len(fresh.skeleton(22))
    assert vol.skeleton.get(new).vertices.shape[0] == parts


def test_publish_run_adds_layers_to_a_pipeline_run_and_serve_run_serves_it(tmp_path):
    """The pipeline's layout: the segment stage wrote RUN/segmentation (with its pyramid) and the store; the EM
    is the run's input (here zarr3). publish_run adds raw, meshes, skeletons, properties and synapses."""
    import urllib.request

    from storage.box import Box
    from storage.volume import create_volume
    from viz.precomputed_volume import PyramidSpec, write_pyramid
    from viz.publish import publish_run
    from viz.viewer import serve_run

    image, seg, frag = viz_sample.make_volumes()
    em = create_volume(str(tmp_path / "em.zarr"), shape_zyx=image.shape, dtype="uint8", voxel_size_xyz_nm=(8, 8, 8),
                       chunk_shape_zyx=(32, 32, 32))
    em.write(Box.from_shape(image.shape), image)
    run = tmp_path / "run"
    seg_info = write_pyramid(run / "segmentation", seg, PyramidSpec("segmentation", (8, 8, 8), chunk_size_xyz=(32, 32, 32),
                                                                     sharded=True))
    viz_sample.make_store(run / STORE, seg, frag).close()

    report = publish_run(run, image=str(tmp_path / "em.zarr"), store=str(run / STORE), meshes=True)
    assert report["meshes"] == 3 and report["skeletons"] == 3 and report["synapses"] == 3
    info = json.loads((run / "segmentation" / "info").read_text())
    assert info["scales"] == seg_info["scales"]  # the segment stage's volume is kept as it was
    assert (info["mesh"], info["skeletons"], info["segment_properties"]) == ("mesh", "skeletons", "segment_properties")
    raw = CloudVolume(f"file://{run}/raw", progress=False)
    np.testing.assert_array_equal(np.asarray(raw[:, :, :])[..., 0].transpose(2, 1, 0), image)
    with serve_run(run) as url:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
