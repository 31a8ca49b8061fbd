"""skeletonize: kimimaro per block with a shared border plane, merged into one skeleton per segment."""

from __future__ import annotations

import numpy as np
import pytest

from segclr.skeletons import (Skeleton, block_read_box, merge_skeletons, skeletonize_region, skeletons_to_table,
                              subsample_nodes, table_to_skeletons)
from storage.box import Box, BlockGrid


def _labelled_volume() -> np.ndarray:
    seg = np.zeros((32, 40, 96), np.uint64)
    seg[10:19, 12:21, 4:92] = 7  # a tube along x crossing the block border at x = 48
    seg[4:28, 28:33, 30:66] = 9  # a slab crossing it too
    seg[20:26, 4:10, 55:70] = 11  # a small piece inside the second block only
    return seg


def _blockwise(seg: np.ndarray, block_x: int) -> dict[int, list[Skeleton]]:
    bounds = Box.from_shape(seg.shape)
    pieces: dict[int, list[Skeleton]] = {}
    for b in BlockGrid(bounds, (seg.shape[0], seg.shape[1], block_x)):
        rb = block_read_box(b.write, bounds)
        assert rb.stop[2] == min(b.write.stop[2] + 1, seg.shape[2])  # one shared plane with the next block
        for sid, sk in skeletonize_region(seg[rb.slices], rb.start, (8, 8, 8), dust_threshold=10).items():
            pieces.setdefault(sid, []).append(sk)
    return pieces


def test_two_blocks_merge_into_one_skeleton_per_segment():
    seg = _labelled_volume()
    pieces = _blockwise(seg, 48)
    assert len(pieces[7]) == 2 and len(pieces[9]) == 2 and len(pieces[11]) == 1
    whole = skeletonize_region(seg, (0, 0, 0), (8, 8, 8), dust_threshold=10)
    for sid in (7, 9, 11):
        merged = merge_skeletons(pieces[sid])  # no joining: the border vertices coincide
        assert merged.num_components() == 1, sid
        assert len(merged) < sum(len(p) for p in pieces[sid]) or sid == 11  # shared vertices were fused
        # the merged cable spans the object like the single-block skeleton does
        assert merged.cable_length() == pytest.approx(whole[sid].cable_length(), rel=0.25)
    tube = merge_skeletons(pieces[7])
    assert tube.vertices[:, 0].min() <= 8 * 6 and tube.vertices[:, 0].max() >= 8 * 89


def test_skeleton_table_round_trip_and_subsampling():
    seg = _labelled_volume()
    skels = {sid: merge_skeletons(p) for sid, p in _blockwise(seg, 48).items()}
    table = skeletons_to_table(skels)
    assert set(table["segment_id"]) == {7, 9, 11}
    assert (table.groupby("segment_id")["parent_id"].apply(lambda s: s.isna().sum()) == 1).all()  # one root each
    back = table_to_skeletons(table)
    for sid, sk in skels.items():
        assert len(back[sid]) == len(sk) and back[sid].num_components() == 1
        assert back[sid].cable_length() == pytest.approx(sk.cable_length(), abs=len(sk))  # nm rounding only
    keep = subsample_nodes(skels[7], 200.0)
    assert 0 < len(keep) < len(skels[7])
    v = skels[7].vertices[keep]
    assert len(np.unique(np.floor(v / 200.0), axis=0)) == len(keep)  # one node per 200 nm cube
