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


def test_relative_rule_merges_on_contact_as_bright_as_interiors():
    # same layout, but the whole image is darker: an absolute threshold would merge nothing, the ratio rule still
    # finds the bright (cytoplasm-like) contact and keeps the membrane
    from pipeline.stages.agglomerate import score_edges, segment_intensity

    labels = np.zeros((1, 6, 9), np.uint64)
    labels[0, :, 0:3] = 1
    labels[0, :, 4:6] = 2
    labels[0, :, 7:9] = 3
    image = np.full(labels.shape, 90, np.uint8)
    image[0, :, 6] = 30
    grown = expand_labels(labels, 1)
    edges = contact_edges(grown, image, (slice(None),) * 3)
    segments = segment_intensity(labels, image)
    assert segments.set_index("segment_id").loc[1, "voxels"] == 18
    scored = score_edges(edges, segments)
    absolute = AgglomerationParams(expand_voxels=1, min_intensity=150, min_contact=3, min_ratio=None)
    assert merge_decisions(scored, absolute).empty
    merges = merge_decisions(scored, AgglomerationParams(expand_voxels=1, min_contact=3, min_ratio=0.9))
    assert merges[["a", "b"]].to_numpy().tolist() == [[1, 2]]
    # the default rule is the relative one
    merges = merge_decisions(edges, AgglomerationParams(min_contact=3), segments)
    assert merges[["a", "b"]].to_numpy().tolist() == [[1, 2]]
    # without segment intensities the absolute threshold decides
    assert merge_decisions(edges, AgglomerationParams(min_contact=3, min_ratio=0.9)).empty


def test_agglomeration_rule_per_model():
    from ffn.model import load_config, resolve_model
    from pipeline.stages.agglomerate import ModelRule, rule_for_model
    from storage.errors import ConfigError

    assert rule_for_model({}) == ModelRule(True, AgglomerationParams(), "default")
    recorded = {"agglomeration": {"enabled": False, "params": {"min_ratio": 0.95, "min_contact": 300}}}
    assert rule_for_model(recorded) == ModelRule(False, AgglomerationParams(min_ratio=0.95, min_contact=300), "model")
    with pytest.raises(ConfigError, match="m/config.json: .*min_ration"):
        rule_for_model({"agglomeration": {"params": {"min_ration": 0.9}}}, where="m/config.json")
    # the packaged small models record the decision measured for them (held out: agglomeration made VOI worse)
    for name in ("synthetic_small", "medulla_small"):
        rule = rule_for_model(load_config(resolve_model(name)).metadata)
        assert rule.source == "model"
        assert not rule.enabled


def test_match_box_is_the_central_slab_around_the_face():
    from pipeline.stages.reconcile import match_box
    from storage.box import Box, BlockGrid

    grid = BlockGrid(Box.from_shape((32, 64, 64)), (16, 32, 32), (8, 16, 16))
    a, b = grid.block(0), grid.block(grid.block_id((0, 0, 1)))
    whole = match_box(a, b, grid.halo, 1.0)
    assert whole == a.read.intersect(b.read) and whole.start[2] == 16 and whole.stop[2] == 48
    central = match_box(b, a, grid.halo, 0.5)  # order of the pair does not matter
    assert central.start[2] == 24 and central.stop[2] == 40 and central.start[:2] == whole.start[:2]
    assert match_box(a, b, grid.halo, 0.01).shape[2] == 2  # never empty


def test_block_seeds_agree_with_the_whole_volume_inside_blocks():
    # seeds from a block's read box + context equal the whole-volume seeds there (position-based tie-breaking);
    # without context the block's seeds differ (edge threshold and distance transform see the crop)
    from pipeline.stages.segment import block_seeds, global_peak_coords
    from storage.box import Box, BlockGrid

    rng = np.random.default_rng(0)
    img = (rng.random((24, 128, 128)) * 40 + 100).astype(np.uint8)
    img[:, ::12, :] = 20
    img[:, :, ::12] = 20

    class Vol:
        bounds = Box.from_shape(img.shape)

        @staticmethod
        def read(box):
            return img[box.slices]

    whole = {tuple(int(v) for v in c) for c in global_peak_coords(img, Vol.bounds)}
    grid = BlockGrid(Vol.bounds, (24, 32, 32), (0, 8, 8))
    block = grid.block(grid.block_id((0, 1, 1)))
    allowed = block.write.grow((0, 4, 4)).intersect(block.read.grow((-2, -4, -4)))
    expect = {c for c in whole if allowed.contains_point(c)}

    def seeds(context):
        s = block_seeds(Vol, block, context=(0, context, context), reach=(0, 4, 4), margin=(2, 4, 4))
        assert list(s.coords) == sorted(s.coords)
        return {tuple(int(v) for v in np.add(c, block.read.start)) for c in s.coords}

    assert not block.read.grow((0, 16, 16)).contains(Vol.bounds)  # the context is a real crop
    assert len(expect) > 10 and seeds(16) == expect
    assert seeds(0) != expect


def test_holes_in_a_write_box_take_the_neighbours_fragment(tmp_path):
    """A block that left part of its write box at 0 (the object there was seeded only by the neighbour) gets the
    neighbour's fragment ids there; labelled voxels and voxels no block labelled are left alone."""
    from pipeline.stages.reconcile import reconcile_block
    from pipeline.stages.segment import save_side_file, side_file, to_global
    from storage.box import Box, BlockGrid
    from storage.volume import create_volume

    grid = BlockGrid(Box.from_shape((8, 32, 64)), (8, 32, 32), (0, 0, 8))
    a, b = grid.block(0), grid.block(1)
    stride = 1000
    la = np.zeros(a.read.shape, np.uint32)
    la[:, :16, :] = 1  # a's own object
    lb = np.zeros(b.read.shape, np.uint32)
    lb[:, 8:24, :] = 2  # an object b flooded; it reaches 8 voxels into a's write box (b's read box)
    save_side_file(side_file(tmp_path, a.block_id), la)
    save_side_file(side_file(tmp_path, b.block_id), lb)
    frags = create_volume(str(tmp_path / "fragments"), shape_zyx=(8, 32, 64), dtype="uint64",
                          voxel_size_xyz_nm=(8, 8, 40), chunk_shape_zyx=(8, 32, 32))
    mine = to_global(la, a.block_id, stride)
    frags.write(a.write, mine[a.write.relative_to(a.read).slices])
    filled = reconcile_block(a, grid_json=grid.to_json(), work_dir=str(tmp_path), stride=stride, min_voxels=50,
                             min_fraction=0.5, fragments_spec=frags.spec)["filled_voxels"]
    out = frags.read(a.write)
    b_id = 1 * stride + 2
    assert filled == 8 * 8 * 8  # rows 16-23 of a's write box inside b's read box (x 24-31)
    assert (out[:, :16, :] == 1).all()  # a's own labels win where a labelled
    assert (out[:, 16:24, 24:32] == b_id).all() and not out[:, 16:24, :24].any()
    assert not out[:, 24:, :].any()


def test_lookup_digest_follows_table_content():
    from pipeline.segmentation import lookup_digest

    t = pd.DataFrame({"fragment_id": np.array([1, 2], np.uint64), "segment_id": np.array([1, 2], np.uint64)})
    same = lookup_digest(t.copy())
    t2 = t.assign(segment_id=np.array([1, 1], np.uint64))
    assert lookup_digest(t) == same and lookup_digest(t2) != same


def test_default_chunks_make_morton_aligned_shards():
    from pipeline.segmentation import SegmentConfig

    for block in [(64, 64, 64), (16, 64, 64), (64, 128, 128), (32, 128, 128)]:
        c = SegmentConfig(input="in", output="out", block_shape=block)
        c.validate()
        ratios = {b // ch for b, ch in zip(block, c.chunk_shape)}
        assert len(ratios) == 1, (block, c.chunk_shape)
