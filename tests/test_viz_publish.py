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
    assert skel == 1  # only cell 33 keeps its skeleton; the merged cell needs the skeleton stage again
