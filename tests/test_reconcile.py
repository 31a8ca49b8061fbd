"""Reconciliation, lookup tables, relabel statistics and agglomeration decisions on hand-made labelings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.stages.agglomerate import (AgglomerationParams, agglomerated_lookup, contact_edges, expand_labels,
                                         merge_decisions)
from pipeline.stages.reconcile import MatchThresholds, build_lookup, match_fragments, overlap_table
from pipeline.stages.relabel import apply_lookup, combine_statistics, segment_statistics


def test_overlap_table_counts_both_directions():
    a = np.array([[1, 1, 1, 2], [1, 1, 0, 2]])
    b = np.array([[7, 7, 8, 8], [7, 7, 8, 0]])
    t = overlap_table(a, b).set_index(["a", "b"])
    assert t.loc[(1, 7), "n_ab"] == 4 and t.loc[(1, 7), "n_a"] == 5 and t.loc[(1, 7), "n_b"] == 4
    assert t.loc[(1, 8), "n_ab"] == 1 and t.loc[(2, 8), "n_ab"] == 1
    assert (2, 7) not in t.index


def test_match_requires_both_direction_fractions():
    # fragment 1 in A covers the overlap parts of 7 and 8 in B: a merge in A must not merge 7 and 8
    a = np.ones((4, 4), np.uint64)
    b = np.zeros((4, 4), np.uint64)
    b[:, :2] = 7
    b[:, 2:] = 8
    pairs = match_fragments(a, b, MatchThresholds(min_voxels=1, min_fraction=0.6))
    assert len(pairs) == 0
    pairs = match_fragments(b, b + (b > 0) * 10, MatchThresholds(min_voxels=1, min_fraction=0.6))
    assert pairs.tolist() == [[7, 17], [8, 18]]


def test_min_voxels_floor():
    a = np.array([1, 1, 0, 0], np.uint64)
    b = np.array([5, 5, 0, 0], np.uint64)
    assert match_fragments(a, b, MatchThresholds(min_voxels=3, min_fraction=0.5)).size == 0
    assert match_fragments(a, b, MatchThresholds(min_voxels=2, min_fraction=0.5)).tolist() == [[1, 5]]


def test_build_lookup_is_order_independent_and_dense():
    frags = np.array([30, 10, 20, 40, 50], np.uint64)
    eq = np.array([[50, 10], [20, 40]], np.uint64)
    lut = build_lookup(frags, eq)
    lut2 = build_lookup(frags[::-1], eq[::-1, ::-1])
    pd.testing.assert_frame_equal(lut, lut2)
    m = dict(zip(lut.fragment_id, lut.segment_id))
    assert m[10] == m[50] == 1 and m[20] == m[40] == 2 and m[30] == 3
    assert sorted(set(m.values())) == [1, 2, 3]


def test_build_lookup_rejects_unknown_fragment():
    with pytest.raises(ValueError, match="no block reported"):
        build_lookup(np.array([1, 2], np.uint64), np.array([[1, 3]], np.uint64))


def test_apply_lookup_maps_and_keeps_background():
    frags = np.array([5, 9, 11], np.uint64)
    segs = np.array([1, 1, 2], np.uint64)
    labels = np.array([[0, 5, 9], [11, 11, 0]], np.uint64)
    out = apply_lookup(labels, frags, segs)
    assert out.tolist() == [[0, 1, 1], [2, 2, 0]]
    with pytest.raises(ValueError, match="not in the lookup table"):
        apply_lookup(np.array([[12]], np.uint64), frags, segs)


def test_segment_statistics_combine_over_blocks():
    vol = np.zeros((4, 4, 4), np.uint64)
    vol[1:3, 0:4, 2] = 3
    vol[0, 0, 0] = 4
    whole = segment_statistics(vol, (0, 0, 0))
    parts = [segment_statistics(vol[:2], (0, 0, 0)), segment_statistics(vol[2:], (2, 0, 0))]
    combined = combine_statistics(parts)
    row = combined.set_index("segment_id").loc[3]
    assert row.voxel_count == 8 and row.min_z == 1 and row.max_z == 3 and row.min_y == 0 and row.max_y == 4
    assert row.sum_x / row.voxel_count == 2
    pd.testing.assert_series_equal(whole.set_index("segment_id")["voxel_count"],
                                   combined.set_index("segment_id")["voxel_count"])


def test_agglomeration_merges_bright_contacts_only():
    labels = np.zeros((1, 6, 9), np.uint64)
    labels[0, :, 0:3] = 1
    labels[0, :, 4:6] = 2   # gap column 3 between 1 and 2 is bright: same cell, FFN split
    labels[0, :, 7:9] = 3   # gap column 6 between 2 and 3 is dark: a membrane
    image = np.full(labels.shape, 180, np.uint8)
    image[0, :, 6] = 40
    grown = expand_labels(labels, 1)
    assert (grown != 0).all()
    edges = contact_edges(grown, image, (slice(None),) * 3)
    params = AgglomerationParams(expand_voxels=1, min_intensity=150, min_contact=3)
    merges = merge_decisions(edges, params)
    assert merges[["a", "b"]].to_numpy().tolist() == [[1, 2]]
    lookup = pd.DataFrame({"fragment_id": np.array([11, 12, 13], np.uint64),
                           "segment_id": np.array([1, 2, 3], np.uint64)})
    out = agglomerated_lookup(lookup, merges)
    assert out.segment_id.tolist() == [1, 1, 2]
