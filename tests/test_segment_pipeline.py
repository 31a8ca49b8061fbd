"""Whole-volume segmentation on Dask: block invariance, resume after a killed driver, readable outputs.

Uses the packaged small FFN trained on synthetic data, a real LocalCluster, real TensorStore volumes and the
DuckDB store. The volume is small so the module runs in about a minute on two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from pipeline.cluster import ClusterConfig, open_client
from pipeline.metrics import evaluate
from pipeline.segmentation import SegmentConfig, run_segmentation
from pipeline.synthetic import SynthParams, generate_box
from storage.box import Box
from storage.volume import create_volume, open_volume

SHAPE = (32, 128, 128)
# the packaged model; CONNECTOME_TEST_SEGMENT_MODEL=DIR runs the module with another model folder
MODEL = os.environ.get("CONNECTOME_TEST_SEGMENT_MODEL", "synthetic_small")
REPO = Path(__file__).resolve().parents[1]


def _model_available() -> bool:
    from ffn.model import resolve_model
    from storage.errors import ConnectomeError

    try:
        resolve_model(MODEL)
    except ConnectomeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _model_available(), reason="packaged FFN model synthetic_small missing")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("segvol")
    params = SynthParams(seed=7, shape_zyx=SHAPE)
    arrays = generate_box(params, Box.from_shape(SHAPE))
    raw = create_volume(str(root / "raw.zarr"), shape_zyx=SHAPE, dtype="uint8",
                        voxel_size_xyz_nm=params.voxel_size_xyz_nm, chunk_shape_zyx=(16, 32, 32))
    raw.write(raw.bounds, arrays["raw"])
    return root, arrays["gt"]


@pytest.fixture(scope="module")
def client():
    with open_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as c:
        yield c


def _segment(client, root: Path, name: str, block_shape, **kw) -> np.ndarray:
    config = SegmentConfig(input=str(root / "raw.zarr"), output=str(root / name), model=MODEL,
                           block_shape=block_shape, overlap=(8, 16, 16), **kw)
    run_segmentation(config, client, progress=False)
    return open_volume(f"precomputed://{root / name / 'segmentation'}").read(Box.from_shape(SHAPE))


def face_cuts(seg: np.ndarray, gt: np.ndarray, faces: list[tuple[int, int]]) -> int:
    """Ground-truth objects whose dominant label changes across a face plane (axis, index of the first voxel
    after the face), summed over faces."""
    cuts = 0
    for axis, p in faces:
        a = np.take(seg, p - 1, axis=axis).ravel()
        b = np.take(seg, p, axis=axis).ravel()
        g = np.take(gt, p - 1, axis=axis).ravel()
        same = (g != 0) & (g == np.take(gt, p, axis=axis).ravel())
        for obj in np.unique(g[same]):
            sel = same & (g == obj)
            pairs, counts = np.unique(np.stack([a[sel], b[sel]]), axis=1, return_counts=True)
            da, db = pairs[:, np.argmax(counts)]
            cuts += int(da != db or da == 0)
    return cuts


@pytest.fixture(scope="module")
def one_and_many(client, volume):
    root, gt = volume
    # agglomeration on (the packaged model records it as off) so the stage runs here, resume test included
    one = _segment(client, root, "one", SHAPE, agglomerate=True)
    many = _segment(client, root, "many", (16, 64, 64), agglomerate=True)
    return one, many, gt


def oracle_image(gt: np.ndarray) -> np.ndarray:
    """EM whose membranes are exactly the ground-truth boundaries: bright objects, dark faces between them."""
    boundary = gt == 0
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        diff = gt[tuple(lo)] != gt[tuple(hi)]
        boundary[tuple(lo)] |= diff
        boundary[tuple(hi)] |= diff
    # thicken membranes in-plane so a 3x3x3 flood cannot leak through diagonal gaps
    boundary = ndi.binary_dilation(boundary, structure=np.ones((1, 3, 3), bool))
    return np.where(boundary, 30, 200).astype(np.uint8)


def test_block_invariance_of_the_machinery(client, volume, tmp_path):
    """With a model whose floods do not depend on context (a hand-set FFN that grows through bright voxels, on EM
    whose membranes are the ground-truth boundaries), 2x2x2 blocks must give the one-block result: this isolates
    seeding, halo, reconciliation and relabel from the trained model's own instability (next test).

    Two settings make the floods path-independent enough: `face_components` movement (the reference's face-max
    follows one branch of a fork, leaving the other to a later seed, so the one-block run itself depends on seed
    order: VOI 0.13 / ARAND 0.057 between the layouts with face-max), and a z overlap of 12 = 2 x (FOV radius 4 +
    delta 2), so an object's body that lies in the overlap can still be seeded by the block (with 8: VOI 0.030 /
    ARAND 0.0032, one object more cut at the z face; measured 2026-11-29)."""
    from ffn.model import save_model
    from test_ffn_inference import grow_model

    _, gt = volume
    raw = create_volume(str(tmp_path / "raw.zarr"), shape_zyx=SHAPE, dtype="uint8", voxel_size_xyz_nm=(8, 8, 40),
                        chunk_shape_zyx=(16, 32, 32))
    raw.write(raw.bounds, oracle_image(gt))
    model, cfg = grow_model(fov=9, delta=2, min_segment_size=50)
    save_model(model, cfg, tmp_path / "grow")

    def seg(name, block):
        config = SegmentConfig(input=str(tmp_path / "raw.zarr"), output=str(tmp_path / name),
                               model=str(tmp_path / "grow"), block_shape=block, overlap=(12, 16, 16),
                               agglomerate=False, inference={"movement": "face_components"})
        run_segmentation(config, client, progress=False)
        return open_volume(f"precomputed://{tmp_path / name / 'segmentation'}").read(Box.from_shape(SHAPE))

    one = seg("one", SHAPE)
    many = seg("many", (16, 64, 64))
    assert len(np.unique(one)) > 3, "the grow model should find objects"
    diff = evaluate(many, one)
    assert diff.voi <= 0.05, f"VOI between 1-block and 2x2x2 runs {diff.voi:.3f}"
    assert diff.arand <= 0.01, f"ARAND between 1-block and 2x2x2 runs {diff.arand:.4f}"
    faces = [(0, 16), (1, 64), (2, 64)]
    assert face_cuts(many, gt, faces) <= face_cuts(one, gt, faces)


@pytest.mark.xfail(reason="measured VOI 1.74 / ARAND 0.24 between 1-block and 2x2x2 with the packaged synthetic "
                          "FFN (100k steps; 2026-11-30 generator): the model is unstable on its own (forward vs "
                          "reverse seed order differs by VOI 1.54 / ARAND 0.19 on this volume), while the block "
                          "machinery is invariant (previous test; pipeline/segmentation.py)",
                   strict=False)
def test_block_invariance(one_and_many):
    one, many, gt = one_and_many
    assert len(np.unique(one)) > 5, "the model should find objects"
    diff = evaluate(many, one)
    assert diff.voi <= 0.05, f"VOI between 1-block and 2x2x2 runs {diff.voi:.3f}"
    assert diff.arand <= 0.01, f"ARAND between 1-block and 2x2x2 runs {diff.arand:.4f}"
    faces = [(0, 16), (1, 64), (2, 64)]
    assert face_cuts(many, gt, faces) <= face_cuts(one, gt, faces)


def test_outputs_open_in_cloudvolume_and_store(one_and_many, volume):
    from cloudvolume import CloudVolume

    from storage import Connectome

    root, _ = volume
    _, many, _ = one_and_many
    cv = CloudVolume(f"file://{root / 'many' / 'segmentation'}", progress=False, fill_missing=False)
    arr = np.asarray(cv[:, :, :])[..., 0]  # xyz
    np.testing.assert_array_equal(arr.transpose(2, 1, 0), many)
    assert len(cv.available_mips) >= 2
    cells = Connectome.open(str(root / "many" / "connectome.duckdb")).cells()
    ids = set(np.unique(many).tolist()) - {0}
    assert set(cells["segment_id"].astype(int)) == ids
    counts = dict(zip(cells["segment_id"].astype(int), cells["voxel_count"].astype(int)))
    some = sorted(ids)[0]
    assert counts[some] == int((many == some).sum())



def test_agglomeration_rule_is_the_models_own(volume, one_and_many):
    """The run applies the rule recorded with its FFN model unless the config sets one, and records which it used
    and where each part came from."""
    import json
    from dataclasses import asdict

    from ffn.model import load_config, resolve_model
    from pipeline.stages.agglomerate import rule_for_model

    root, _ = volume
    used = json.loads((root / "many" / "segment_summary.json").read_text())["agglomeration"]
    rule = rule_for_model(load_config(resolve_model(MODEL)).metadata)
    assert used == {"on": True, "source": {"on": "config", "params": rule.source}, **asdict(rule.params)}
    assert (root / "many" / "agglomeration_edges.parquet").is_file()


def _cli(root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "segment", "--input", str(root / "raw.zarr"),
            "--output", str(root / name), "--model", MODEL, "--block-shape", "16", "64", "64",
            "--overlap", "8", "16", "16", "--workers", "2", "--agglomerate"]


def test_resume_after_killed_driver(volume, one_and_many):
    root, _ = volume
    _, many, _ = one_and_many
    # same parameters as "many", through the CLI; kill the driver once segment has finished some blocks
    from storage.ledger import read_done_count

    proc = subprocess.Popen(_cli(root, "killed"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ledger = root / "killed" / "work" / "ledgers"
    deadline = time.time() + 300
    done_before = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done_before = read_done_count(ledger, "segment")
        except Exception:
            done_before = 0
        if done_before >= 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = read_done_count(ledger, "segment")  # blocks may have finished between the poll and the kill
    out = subprocess.run(_cli(root, "killed"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert 1 <= done_before < 8, "the driver should have been killed part way through segment"
    assert f"{done_before} done in ledger" in out.stderr, out.stderr
    resumed = open_volume(f"precomputed://{root / 'killed' / 'segmentation'}").read(Box.from_shape(SHAPE))
    np.testing.assert_array_equal(resumed, many)
