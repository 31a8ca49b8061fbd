"""Viewer state, shareable URLs, the `connectome view` command and proofreading actions (no browser here)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import neuroglancer
import pytest

import viz_sample
from storage.errors import ConnectomeError
from viz.proofread import MERGE_ACTION, SPLIT_ACTION, UNDO_ACTION, ProofreadSession, ViewerProofreader, attach, id_map
from viz.publish import STORE, publish_layers
from viz.server import serve
from viz.viewer import build_state, describe_run, open_viewer, shareable_state, shareable_url

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("viewer") / "run"
    image, seg, frag = viz_sample.make_volumes()
    publish_layers(run, voxel_size_xyz_nm=viz_sample.VOXEL_SIZE_XYZ, image=image, segmentation=seg, fragments=frag,
                   skeleton_nodes=viz_sample.skeleton_nodes(), segments=viz_sample.segment_table(seg),
                   synapses=viz_sample.synapses(), version=1)
    return run


@pytest.fixture()
def store_run(run_dir, tmp_path):
    """A private copy of the run's store (edits must not leak between tests)."""
    _, seg, frag = viz_sample.make_volumes()
    store = viz_sample.make_store(tmp_path / STORE, seg, frag)
    yield store
    store.close()


def test_state_has_every_layer_explicit_dimensions_and_linked_synapses(run_dir):
    view = describe_run(run_dir, data_url="http://127.0.0.1:9")
    assert set(view.sources) == {"raw", "segmentation", "fragments", "synapses"}
    assert view.sources["raw"] == "precomputed://http://127.0.0.1:9/raw"
    assert view.voxel_size_xyz_nm == (8.0, 8.0, 8.0) and view.bounds_xyz == ((0, 0, 0), (64, 64, 64))
    assert view.default_segments == [22, 11, 33]  # largest first (22 is the biggest blob)
    state = build_state(view)
    dims = state.dimensions.to_json()
    assert dims == {"x": [8e-9, "m"], "y": [8e-9, "m"], "z": [8e-9, "m"]}
    assert list(state.position) == [32, 32, 32]
    assert [layer.name for layer in state.layers] == ["em", "segmentation", "fragments", "synapses"]
    assert sorted(int(s) for s in state.layers["segmentation"].segments) == [11, 22, 33]
    assert state.layers["fragments"].visible is False
    synapses = state.layers["synapses"].layer
    assert dict(synapses.linked_segmentation_layer) == {"pre_segment": "segmentation", "post_segment": "segmentation"}
    assert list(synapses.filter_by_segmentation) == ["pre_segment", "post_segment"]


def test_shareable_state_for_http_run_round_trips_through_a_url(tmp_path, run_dir):
    with serve(run_dir.parent) as server:
        remote = f"{server.url}/{run_dir.name}"
        state = shareable_state(remote, segments=[11])
        assert state.layers["segmentation"].layer.source[0].url == f"precomputed://{remote}/segmentation"
        url = shareable_url(state, "https://neuroglancer.example.org")
        assert url.startswith("https://neuroglancer.example.org/#!")
        back = neuroglancer.parse_url(url)
        assert back.layers["em"].layer.source[0].url == f"precomputed://{remote}/raw"
        assert back.dimensions.to_json() == state.dimensions.to_json()
    with pytest.raises(ConnectomeError, match="gs://"):
        shareable_state(str(run_dir))


def test_view_command_state_and_errors(run_dir, capsys):
    from pipeline.cli import main

    with serve(run_dir.parent) as server:
        assert main(["view", f"{server.url}/{run_dir.name}", "--state", "--segments", "11,22"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1].startswith("https://") and "#!" in lines[-1]
        state = json.loads("\n".join(lines[:-1]))
        assert state["layers"][1]["segments"] == ["11", "22"]
        assert state["layers"][0]["source"][0]["url"].startswith(f"precomputed://{server.url}/")
    assert main(["view", str(run_dir / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: run directory")
    assert main(["view", str(run_dir), "--state"]) == 2
    assert "gs://" in capsys.readouterr().err


def test_view_command_serves_viewer_and_data_until_interrupted(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "view", str(run_dir), "--no-proofread"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/v/" in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        data_line = proc.stderr.readline()
        data_url = data_line.split()[1]
        assert data_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{data_url}/segmentation/info", timeout=10) as resp:
            assert json.loads(resp.read())["mesh"] == "mesh"
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_proofreading_actions_edit_the_store(run_dir, store_run):
    with open_viewer(run_dir, segments=[11, 22]) as session:
        proofreader = ViewerProofreader(session.viewer, ProofreadSession(store_run, 1, user="alice")).install()
        bindings = session.viewer.config_state.state.input_event_bindings.viewer
        assert bindings["alt+keym"] == MERGE_ACTION and bindings["alt+keyx"] == SPLIT_ACTION

        def invoke(action, extra=None):
            proofreader.done.clear()
            session.viewer.actions.invoke(action, {"viewerState": session.viewer.state.to_json(), **(extra or {})})
            assert proofreader.done.is_set()

        invoke(MERGE_ACTION)
        merged = proofreader.last_result
        assert proofreader.last_error is None and merged.segments_before == [11, 22]
        assert store_run.version == merged.version == 2
        new = merged.segments_after[0]
        assert sorted(id_map(store_run, segments=[new]).fragment_id) == [101, 102, 201, 202]
        assert store_run.edits().iloc[-1]["user_name"] == "alice"
        assert [sorted(g) for g in session.viewer.state.layers["segmentation"].equivalences.sets()] == [[11, 22]]
        frag_groups = sorted(sorted(g) for g in session.viewer.state.layers["fragments"].equivalences.sets())
        assert frag_groups == [[101, 102, 201, 202], [301, 302]]
        # merged already: the group counts once, so a third segment makes a valid pair
        with session.viewer.txn() as s:
            s.layers["segmentation"].segments = [11, 22, 33]
        invoke(MERGE_ACTION)
        assert proofreader.last_error is None and proofreader.last_result.segments_before == [new, 33]
        invoke(UNDO_ACTION)
        assert proofreader.last_result.kind == "undo" and store_run.fragments(33) == [301, 302]
        # errors are shown, not raised, and change nothing
        version = store_run.version
        with session.viewer.txn() as s:
            s.layers["segmentation"].segments = [33]
        invoke(MERGE_ACTION)
        assert "exactly two" in proofreader.last_error and store_run.version == version
        invoke(SPLIT_ACTION)  # nothing hovered
        assert "hover a fragment" in proofreader.last_error
        status = session.viewer.config_state.state.status_messages["proofreading"]
        assert "failed" in status


def test_scripted_split_and_attach_errors(run_dir, store_run, tmp_path):
    session = ProofreadSession(store_run, 1)
    result = session.split_fragments([301])
    assert sorted(store_run.fragments(s) for s in result.segments_after) == [[301], [302]]
    with pytest.raises(ConnectomeError, match="no fragments besides"):
        session.split_fragments([301])
    with pytest.raises(ConnectomeError, match="different segments"):
        session.split_fragments([101, 201])
    with open_viewer(run_dir) as viewer_session:
        with pytest.raises(ConnectomeError, match="no connectome store"):
            attach(viewer_session, store=str(tmp_path / "nope.duckdb"))
