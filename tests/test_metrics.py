"""Metrics on hand-made cases with known values (VOI in bits, ARAND as CREMI/SNEMI, counts, ERL)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.metrics import (adapted_rand_error, contingency, evaluate, expected_run_length, gt_skeletons,
                              split_merge_counts, voi)
from storage.errors import ConnectomeError


def halves(shape=(4, 8, 8)):
    a = np.zeros(shape, np.uint64)
    a[..., : shape[-1] // 2] = 1
    a[..., shape[-1] // 2:] = 2
    return a


def test_perfect_segmentation_scores_zero_whatever_the_ids():
    gt = halves()
    seg = np.where(gt == 1, 70, 9).astype(np.uint64)   # other ids, same partition
    s = evaluate(seg, gt)
    assert s.voi == 0.0 and s.voi_split == 0.0 and s.voi_merge == 0.0
    assert s.arand == 0.0 and s.splits == 0 and s.merges == 0 and s.segments == 2 == s.gt_segments


def test_a_split_in_two_is_one_bit_of_split():
    gt = np.ones((4, 8, 8), np.uint64)
    seg = halves()
    split, merge = voi(contingency(seg, gt))
    assert split == pytest.approx(1.0) and merge == pytest.approx(0.0)
    are, precision, recall = adapted_rand_error(contingency(seg, gt))
    assert precision == pytest.approx(1.0) and recall == pytest.approx(0.5)
    assert are == pytest.approx(1 - 2 * 0.5 / 1.5)
    assert split_merge_counts(contingency(seg, gt)) == (1, 0)


def test_a_merge_of_two_is_one_bit_of_merge():
    gt = halves()
    seg = np.ones_like(gt)
    s = evaluate(seg, gt)
    assert s.voi_merge == pytest.approx(1.0) and s.voi_split == pytest.approx(0.0)
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(1.0)
    assert (s.splits, s.merges) == (0, 1)


def test_uneven_split_matches_the_entropy_formula():
    gt = np.ones((1, 1, 4), np.uint64)
    seg = np.array([[[1, 2, 2, 2]]], np.uint64)
    split, merge = voi(contingency(seg, gt))
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert split == pytest.approx(h) and merge == 0.0


def test_ground_truth_zero_is_ignored_and_seg_zero_counts_as_singletons():
    gt = halves()
    seg = np.where(gt == 1, 5, 6).astype(np.uint64)
    gt_with_bg = gt.copy()
    gt_with_bg[0] = 0
    seg_noise = seg.copy()
    seg_noise[0] = np.arange(seg[0].size).reshape(seg[0].shape) + 100  # garbage where gt is 0
    assert evaluate(seg_noise, gt_with_bg).voi == 0.0
    # unlabelled (0) segmentation inside gt: each voxel its own segment for ARAND
    gt1 = np.ones((1, 1, 4), np.uint64)
    are, precision, recall = adapted_rand_error(contingency(np.zeros_like(gt1), gt1))
    assert precision == pytest.approx(1.0) and recall == pytest.approx(0.25)
    assert are == pytest.approx(1 - 2 * 0.25 / 1.25)


def test_min_overlap_ignores_slivers():
    gt = halves((2, 10, 10))
    seg = gt.copy()
    seg[0, 0, 0] = 2   # one voxel of segment 2 inside gt 1
    assert split_merge_counts(contingency(seg, gt), min_overlap=1) == (1, 1)
    assert split_merge_counts(contingency(seg, gt), min_overlap=2) == (0, 0)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ConnectomeError, match="differs from ground truth shape"):
        evaluate(np.zeros((2, 2, 2), np.uint64), np.zeros((2, 2, 3), np.uint64))


def tubes():
    """Two parallel tubes along x, 12 voxels apart, 120 voxels long (voxel 10 nm)."""
    gt = np.zeros((12, 32, 128), np.uint64)
    gt[3:9, 3:9, 4:124] = 1
    gt[3:9, 20:26, 4:124] = 2
    return gt


def test_erl_of_halved_and_merged_tubes():
    gt = tubes()
    skels = gt_skeletons(gt, (10.0, 10.0, 10.0), dust_voxels=10)
    assert len(skels) == 2
    length = np.mean([s.edge_nm.sum() for s in skels])
    perfect = expected_run_length(gt, skels)
    assert perfect == pytest.approx(length, rel=0.05)
    halved = gt.copy()
    halved[:, :, 64:] = np.where(gt[:, :, 64:] > 0, gt[:, :, 64:] + 10, 0)
    assert expected_run_length(halved, skels) == pytest.approx(length / 2, rel=0.15)
    merged = np.where(gt > 0, 1, 0).astype(np.uint64)
    assert expected_run_length(merged, skels) == 0.0
    s = evaluate(halved, gt, voxel_size_xyz_nm=(10, 10, 10), erl=True)
    assert s.erl_nm == pytest.approx(length / 2, rel=0.15) and s.gt_erl_nm == pytest.approx(length, rel=0.05)


def test_evaluate_cli_reads_h5_and_prints_json(tmp_path):
    gt = tubes()
    seg = gt.copy()
    seg[:, :, 64:] = np.where(gt[:, :, 64:] > 0, gt[:, :, 64:] + 10, 0)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["gt"] = gt
        f["seg"] = seg
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", f"{tmp_path}/v.h5:seg",
                          f"{tmp_path}/v.h5:gt", "--erl", "--voxel-size", "10", "10", "10"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["voi_split"] == pytest.approx(1.0) and last["voi_merge"] == 0.0
    assert last["splits"] == 2 and last["merges"] == 0 and last["erl_nm"] > 0
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", f"{tmp_path}/v.h5:nope",
                          f"{tmp_path}/v.h5:gt"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope" in bad.stderr
