"""The classical baseline (smoothed-intensity watershed) on synthetic data: proof that the data are not trivial."""

from __future__ import annotations

import numpy as np

from pipeline.baseline import WatershedParams, best_baseline, watershed_baseline
from pipeline.metrics import evaluate
from synth_cache import synth_volume

GRID = (WatershedParams(sigma_nm=12.0, h=10.0), WatershedParams(sigma_nm=24.0, h=10.0),
        WatershedParams(sigma_nm=12.0, h=20.0, markers="distance", threshold=125.0))


def test_watershed_separates_two_bright_cells_at_a_dark_membrane():
    raw = np.full((4, 32, 64), 180, np.uint8)
    raw[:, :, 31:33] = 40
    seg = watershed_baseline(raw, (8.0, 8.0, 40.0), WatershedParams(sigma_nm=8.0, h=5.0))
    assert seg[0, 10, 5] != seg[0, 10, 60] and len(np.unique(seg)) == 2


def test_baseline_is_far_from_perfect_on_synthetic_data():
    params, block = synth_volume()
    raw, gt = block.volumes["raw"], block.volumes["gt"]
    train, test = slice(0, 64), slice(64, 128)          # choose the setting on one half, score on the other
    best, train_scores, results = best_baseline(raw[train], gt[train], params.voxel_size_xyz_nm, GRID)
    assert len(results) == len(GRID)
    scores = evaluate(watershed_baseline(raw[test], params.voxel_size_xyz_nm, best), gt[test])
    print(f"baseline {best}: VOI {scores.voi:.3f} (split {scores.voi_split:.3f}, merge {scores.voi_merge:.3f}), "
          f"ARAND {scores.arand:.3f}")
    assert scores.voi > 0.5 and train_scores.voi > 0.5
    assert evaluate(gt[test], gt[test]).voi == 0.0
