"""Synapse detection quality: one-to-one matching of detected to true clefts by distance (CREMI-style).

A detection and a ground-truth synapse match when their cleft positions are within `max_distance_nm`; the
assignment is the minimum-total-distance one-to-one matching (Hungarian), so two detections of one cleft count as
one true positive and one false positive, as in the CREMI synaptic-partner evaluation. Partner accuracy is the
fraction of matched synapses whose (pre, post) ids equal the true ones after mapping predicted segment ids to
ground-truth ids (identity when detection ran on the ground-truth segmentation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


def match_synapses(pred_nm: np.ndarray, true_nm: np.ndarray, max_distance_nm: float) -> list[tuple[int, int]]:
    """Index pairs (pred, true) of the optimal one-to-one matching within max_distance_nm."""
    if len(pred_nm) == 0 or len(true_nm) == 0:
        return []
    d = cdist(np.asarray(pred_nm, float), np.asarray(true_nm, float))
    big = 1e12
    cost = np.where(d <= max_distance_nm, d, big)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if cost[r, c] < big]


def detection_scores(pred: pd.DataFrame, true: pd.DataFrame, max_distance_nm: float,
                     pred_cols=("x_nm", "y_nm", "z_nm"), true_cols=("x_nm", "y_nm", "z_nm"),
                     id_map: dict[int, int] | None = None) -> dict:
    """precision, recall, f1 and (when both tables carry partners) partner_accuracy."""
    pairs = match_synapses(pred[list(pred_cols)].to_numpy(), true[list(true_cols)].to_numpy(), max_distance_nm)
    tp = len(pairs)
    precision = tp / len(pred) if len(pred) else 0.0
    recall = tp / len(true) if len(true) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
           "predicted": int(len(pred)), "true": int(len(true)), "matched": tp}
    if tp and {"pre_segment_id", "post_segment_id"} <= set(pred.columns) <= set(pred.columns) and \
            {"pre_segment_id", "post_segment_id"} <= set(true.columns):
        m = id_map or {}
        correct = 0
        for p, t in pairs:
            pp = m.get(int(pred["pre_segment_id"].iloc[p]), int(pred["pre_segment_id"].iloc[p]))
            pq_ = m.get(int(pred["post_segment_id"].iloc[p]), int(pred["post_segment_id"].iloc[p]))
            correct += (pp == int(true["pre_segment_id"].iloc[t])) and (pq_ == int(true["post_segment_id"].iloc[t]))
        out["partner_accuracy"] = round(correct / tp, 4)
    return out


def overlap_id_map(pred_seg: np.ndarray, true_seg: np.ndarray) -> dict[int, int]:
    """Each predicted segment -> the ground-truth id it overlaps most (for partner accuracy on predicted seg)."""
    a = pred_seg.ravel().astype(np.uint64)
    b = true_seg.ravel().astype(np.uint64)
    fg = (a != 0) & (b != 0)
    df = pd.DataFrame({"a": a[fg], "b": b[fg]})
    if df.empty:
        return {}
    counts = df.groupby(["a", "b"]).size().reset_index(name="n").sort_values(["a", "n"], ascending=[True, False])
    best = counts.drop_duplicates("a")
    return dict(zip(best["a"].astype(int), best["b"].astype(int)))
