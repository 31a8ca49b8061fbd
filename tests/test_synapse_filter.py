"""The synapse candidate filter: evidence per candidate, fitting, the verdict in the store table, bad records, and
the packaged detector's filter on generated volumes it was not fitted on."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline.stages.synapses import FILTER_CALIBRATION, DetectionParams, detect, synapse_table
from pipeline.synapse_filter import (FEATURES, CandidateFilter, apply_filter, f1_at, fit_filter, load_filter,
                                     neighbour_context, save_filter)
from storage.errors import ConfigError

VOXEL = (40.0, 8.0, 8.0)  # zyx nm


def _two_cells_with_a_blob():
    """Segments 1 | 2 side by side; a cleft-like blob on their shared face and another deep inside segment 1."""
    seg = np.zeros((5, 24, 40), np.uint64)
    seg[:, :, :20] = 1
    seg[:, :, 20:] = 2
    probs = np.zeros((3,) + seg.shape, np.float32)
    probs[0, 1:4, 8:14, 19:21] = 0.95           # on the membrane between 1 and 2
    probs[0, 1:4, 8:14, 3:5] = 0.95             # inside segment 1 (a mitochondrion, say)
    probs[1, :, 4:18, 12:20] = 0.8              # presynaptic side in 1
    probs[2, :, 4:18, 20:28] = 0.8              # postsynaptic side in 2
    return seg, probs


def test_evidence_tells_a_cleft_on_the_membrane_from_a_blob_inside_a_cell():
    seg, probs = _two_cells_with_a_blob()
    image = np.zeros(seg.shape, np.float32)
    image[probs[0] > 0.5] = -2.0  # both blobs dark
    df = detect(probs, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=160), image=image)
    assert len(df) == 2
    on_face = df.loc[(df["x"] - 19.5).abs().idxmin()]
    inside = df.loc[(df["x"] - 3.5).abs().idxmin()]
    assert on_face["interface"] == pytest.approx(1.0)
    assert inside["interface"] < 0.2
    assert on_face["darkness"] > 0 and on_face["z_sections"] == 3
    assert set(FEATURES) - {"nn_nm", "nn_larger", "nn_same_pre"} <= set(df.columns)


def _candidates(n=400, seed=0) -> pd.DataFrame:
    """Candidates whose truth depends on interface and size, the way real ones do."""
    rng = np.random.default_rng(seed)
    tp = rng.random(n) < 0.6
    df = pd.DataFrame({name: rng.random(n) for name in FEATURES})
    df["interface"] = np.where(tp, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.6, n))
    df["size_voxels"] = np.where(tp, rng.integers(100, 2000, n), rng.integers(20, 300, n))
    df["tp"] = tp.astype(int)
    return df


def test_fit_filter_learns_the_evidence_and_round_trips(tmp_path):
    train, test = _candidates(seed=0), _candidates(seed=1)
    fitted = fit_filter(train, n_true=int(train["tp"].sum()))
    assert 0.05 <= fitted.threshold <= 0.95
    coef = dict(zip(fitted.features, fitted.coef))
    assert coef["interface"] > 0 and coef["size_voxels"] > 0
    prob = fitted.probability(test)
    n_true = int(test["tp"].sum())
    f1, precision, _ = f1_at(prob, test["tp"].to_numpy(), n_true, fitted.threshold)
    f1_all, precision_all, _ = f1_at(np.ones(len(test)), test["tp"].to_numpy(), n_true, 0.5)
    assert f1 > f1_all + 0.1 and precision > 0.9 > precision_all
    save_filter(fitted, tmp_path)
    np.testing.assert_array_equal(load_filter(tmp_path).probability(test), prob)
    assert load_filter(tmp_path / "nowhere") is None


def test_fit_filter_chooses_its_threshold_out_of_fold():
    """With volumes to split, the threshold comes from probabilities of models that never saw the scored volume;
    the filter itself is still fitted on every candidate."""
    train = pd.concat([_candidates(n=150, seed=s).assign(seed=s) for s in range(4)], ignore_index=True)
    n_true = int(train["tp"].sum())
    pooled = fit_filter(train.drop(columns="seed"), n_true)
    by_volume = fit_filter(train, n_true)
    np.testing.assert_allclose(by_volume.coef, pooled.coef)
    assert 0.05 <= by_volume.threshold <= 0.95
    # labels of pure noise: in-sample probabilities seem to separate them and lift the threshold; out of fold
    # nothing separates, so keeping every candidate (the lowest threshold) gives the best F1
    noise = train.assign(tp=(np.random.default_rng(0).random(len(train)) < 0.5).astype(int))
    n_noise = int(noise["tp"].sum())
    assert fit_filter(noise, n_noise).threshold == 0.05 < fit_filter(noise.drop(columns="seed"), n_noise).threshold


def test_rejected_candidates_stay_in_the_table_outside_the_valid_view():
    seg, probs = _two_cells_with_a_blob()
    image = np.zeros(seg.shape, np.float32)
    df = detect(probs, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=160), image=image)
    only_interface = CandidateFilter(FEATURES, [0.0] * len(FEATURES), [1.0] * len(FEATURES),
                                     [10.0 if f == "interface" else 0.0 for f in FEATURES], -5.0, 0.5)
    judged = apply_filter(df, only_interface, VOXEL)
    table = synapse_table(judged, (8.0, 8.0, 40.0))
    assert len(table) == 2, "the rejected candidate is kept as evidence"
    assert table["valid"].sum() == 1
    kept = table[table["valid"]].iloc[0]
    assert abs(kept["x_nm"] - 20 * 8) <= 8 and kept["score"] > 0.99
    assert (apply_filter(df, None, VOXEL)["accepted"]).all()


def test_a_filter_used_on_other_candidates_says_so(tmp_path):
    """Its evidence is calibrated for one cleft threshold, flip averaging and merge distance; other settings run,
    with a warning."""
    from pipeline.stages.synapses import synapses_from_candidates

    seg, probs = _two_cells_with_a_blob()
    params = DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=160, flips=1)
    df = detect(probs, seg, VOXEL, params, image=np.zeros(seg.shape, np.float32))
    save_filter(CandidateFilter(FEATURES, [0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES),
                                1.0, 0.5, {"detection": {"threshold": 0.8, "flips": 16}}), tmp_path)
    with pytest.warns(UserWarning, match=r"fitted for threshold 0.8 \(running with 0.5\), flips 16"):
        synapses_from_candidates(df, str(tmp_path), params, (8.0, 8.0, 40.0))
    save_filter(CandidateFilter(FEATURES, [0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES),
                                1.0, 0.5, {"detection": {"threshold": 0.5, "flips": 1}}), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not synapses_from_candidates(df, str(tmp_path), params, (8.0, 8.0, 40.0)).empty


def test_neighbour_context_marks_the_smaller_of_two_close_pieces():
    df = pd.DataFrame({"z": [5.0, 5.0, 40.0], "y": [10.0, 14.0, 100.0], "x": [10.0, 10.0, 100.0],
                       "size_voxels": [500, 40, 300], "pre_segment_id": [1, 1, 7]})
    ctx = neighbour_context(df, VOXEL)
    assert ctx["nn_nm"].iloc[0] == pytest.approx(32.0)
    assert list(ctx["nn_larger"]) == [0, 1, 0] and list(ctx["nn_same_pre"][:2]) == [1, 1]


def test_bad_filter_records_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown feature"):
        CandidateFilter(("size_voxels", "colour"), (0, 0), (1, 1), (1, 1), 0.0, 0.5)
    with pytest.raises(ConfigError, match="same length"):
        CandidateFilter(("size_voxels",), (0, 0), (1,), (1,), 0.0, 0.5)
    (tmp_path / "candidate_filter.json").write_text("{not json")
    with pytest.raises(ConfigError, match="candidate_filter.json"):
        load_filter(tmp_path)
    (tmp_path / "candidate_filter.json").write_text(json.dumps({"features": ["size_voxels"]}))
    with pytest.raises(ConfigError, match="bad candidate filter"):
        load_filter(tmp_path)


def test_packaged_detector_carries_a_filter_that_raises_precision():
    """On generated volumes outside its fitting (401-500) and validation (301-312) seeds, the packaged filter raises
    precision and keeps recall and F1 within reach.

    What the filter buys is precision; its F1 gain is small next to what two volumes can resolve (29 synapses: one
    synapse is 0.03 of F1). Over seeds 501-508 (111 synapses) the step-68,000 filter (at its fitted 0.55, before the
    contact split) gives precision 0.83 -> 0.93, recall 0.86 -> 0.80, F1 0.846 -> 0.860; on 501-502 alone F1
    0.793 -> 0.784. The benchmark's held-out F1 (benchmarks/synapse_quality.py) is the figure for F1."""
    from pipeline.synapse_filter import labelled_candidates
    from pipeline.synapse_model import resolve_model

    model_dir = resolve_model("synapses_small")
    fitted = load_filter(model_dir)
    assert fitted is not None, "synapses_small ships candidate_filter.json"
    # fitted for the candidates the default detection makes (cleft threshold, flip averaging, merge distance)
    defaults = DetectionParams()
    assert {k: fitted.metadata["detection"][k] for k in FILTER_CALIBRATION} == \
        {k: getattr(defaults, k) for k in FILTER_CALIBRATION}
    candidates, n_true = labelled_candidates(model_dir, [501, 502], (48, 192, 192))
    tp = candidates["tp"].to_numpy()
    f1, precision, recall = f1_at(fitted.probability(candidates), tp, n_true, fitted.threshold)
    f1_all, precision_all, recall_all = f1_at(np.ones(len(candidates)), tp, n_true, 0.5)
    assert precision >= precision_all + 0.05, (precision, precision_all)
    assert recall >= recall_all - 0.15, (recall, recall_all)
    assert f1 >= f1_all - 0.03, (f1, f1_all)  # at most one synapse's worth below


def test_candidates_pool_partners_from_ground_truth_and_an_ffn():
    """The filter is fitted on candidates whose partners come from the generator's labels and from an FFN run, so
    it also judges candidates on a real segmentation; each source counts the true synapses once."""
    from pipeline.synapse_filter import labelled_candidates

    gt_only, n_gt = labelled_candidates("synapses_small", [503], (32, 96, 96))
    both, n_both = labelled_candidates("synapses_small", [503], (32, 96, 96),
                                       segmentations=("gt", "synthetic_small"))
    assert n_both == 2 * n_gt > 0
    assert set(both["segmentation"]) == {"gt", "synthetic_small"}
    assert len(both[both["segmentation"] == "gt"]) == len(gt_only)
    assert set(FEATURES) <= set(both.columns) and both["tp"].isin([0, 1]).all()
