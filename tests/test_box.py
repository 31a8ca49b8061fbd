"""Property tests for Box and BlockGrid: tiling, alignment, halo clipping, neighbours, ids, XYZ<->ZYX."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from storage.box import BlockGrid, Box, label_stride
from storage.errors import VolumeError

coord = st.integers(-50, 50)
extent = st.integers(1, 40)


@st.composite
def boxes(draw):
    start = tuple(draw(coord) for _ in range(3))
    shape = tuple(draw(extent) for _ in range(3))
    return Box.from_shape(shape, start)


@st.composite
def grids(draw):
    bounds = draw(boxes())
    alignment = tuple(draw(st.integers(1, 8)) for _ in range(3))
    block_shape = tuple(a * draw(st.integers(1, 4)) for a in alignment)
    halo = tuple(draw(st.integers(0, 6)) for _ in range(3))
    grid = BlockGrid(bounds, block_shape, halo=halo, alignment=alignment)
    assume(grid.num_blocks <= 150)  # keep examples fast; tiling logic is the same at any size
    return grid


SETTINGS = settings(max_examples=50, deadline=None)


@SETTINGS
@given(grids())
def test_write_boxes_tile_bounds_exactly_without_overlap(grid):
    b = grid.bounds
    cover = np.zeros(b.shape, dtype=np.int32)
    for block in grid:
        assert not block.write.empty
        assert b.contains(block.write)
        cover[block.write.relative_to(b).slices] += 1
    assert (cover == 1).all()


@SETTINGS
@given(grids())
def test_write_boxes_aligned_to_alignment_grid_from_bounds_origin(grid):
    for block in grid:
        rel = block.write.relative_to(grid.bounds)
        for axis in range(3):
            assert rel.start[axis] % grid.alignment[axis] == 0
            # a stop is aligned unless the box is clipped at the far face of the bounds
            assert rel.stop[axis] % grid.alignment[axis] == 0 or block.write.stop[axis] == grid.bounds.stop[axis]


@SETTINGS
@given(grids())
def test_read_box_is_write_box_grown_by_halo_clipped_to_bounds(grid):
    for block in grid:
        assert block.read == block.write.grow(grid.halo).intersect(grid.bounds)
        assert block.read.contains(block.write) and grid.bounds.contains(block.read)
        for axis in range(3):
            lo = max(grid.bounds.start[axis], block.write.start[axis] - grid.halo[axis])
            hi = min(grid.bounds.stop[axis], block.write.stop[axis] + grid.halo[axis])
            assert (block.read.start[axis], block.read.stop[axis]) == (lo, hi)


@SETTINGS
@given(grids(), st.booleans())
def test_neighbour_relation_symmetric_and_adjacent(grid, faces_only):
    for block in grid:
        for other in grid.neighbours(block.block_id, faces_only=faces_only):
            assert other != block.block_id
            assert block.block_id in grid.neighbours(other, faces_only=faces_only)
            d = [abs(a - b) for a, b in zip(grid.index_of(other), block.index)]
            assert max(d) == 1 and (sum(d) == 1 or not faces_only)
    pairs = list(grid.forward_neighbour_pairs())
    assert len(pairs) == len(set(pairs))
    face_pairs = {(a, b) for a, b, _ in pairs}
    expected = {(min(a, n), max(a, n)) for a in range(grid.num_blocks) for n in grid.neighbours(a)}
    assert face_pairs == expected


@SETTINGS
@given(grids())
def test_block_ids_bijective_and_stable(grid):
    ids = [b.block_id for b in grid]
    assert ids == list(range(grid.num_blocks))
    indices = [b.index for b in grid]
    assert len(set(indices)) == grid.num_blocks
    for block in grid:
        assert grid.block_id(block.index) == block.block_id
        assert grid.index_of(block.block_id) == block.index
    again = BlockGrid.from_json(grid.to_json())
    assert [again.block(i) for i in range(grid.num_blocks)] == [grid.block(i) for i in range(grid.num_blocks)]


@SETTINGS
@given(grids(), boxes())
def test_blocks_in_finds_exactly_intersecting_write_boxes(grid, box):
    expected = [b.block_id for b in grid if not b.write.intersect(box).empty]
    assert grid.blocks_in(box) == expected


@SETTINGS
@given(st.tuples(coord, coord, coord), st.tuples(extent, extent, extent))
def test_from_xyz_round_trip(start_xyz, shape_xyz):
    stop_xyz = tuple(a + s for a, s in zip(start_xyz, shape_xyz))
    box = Box.from_xyz(start_xyz, stop_xyz)
    assert box.xyz_start == start_xyz and box.xyz_stop == stop_xyz
    assert box.start == tuple(reversed(start_xyz)) and box.shape == tuple(reversed(shape_xyz))
    assert Box.from_json(box.to_json()) == box
    # XYZ in the message, as a person reads it
    assert str(box).startswith(f"[{start_xyz[0]},{start_xyz[1]},{start_xyz[2]} :")


@SETTINGS
@given(boxes(), boxes())
def test_intersect_and_contains(a, b):
    inter = a.intersect(b)
    assert a.contains(inter) or inter.empty
    for p in itertools.product(*(range(lo, hi) for lo, hi in zip(inter.start, inter.stop))):
        assert a.contains_point(p) and b.contains_point(p)
        break
    assert inter.size == int(np.prod([max(0, min(x1, y1) - max(x0, y0))
                                      for x0, x1, y0, y1 in zip(a.start, a.stop, b.start, b.stop)]))


def test_label_stride_exceeds_read_voxels():
    assert label_stride((8, 8, 8), (1, 1, 1)) == 10 ** 3 + 1


def test_bad_grids_are_one_line_errors():
    with pytest.raises(VolumeError, match="not a multiple"):
        BlockGrid(Box.from_shape((10, 10, 10)), (6, 6, 6), alignment=(4, 4, 4))
    with pytest.raises(VolumeError, match="empty box"):
        BlockGrid(Box((0, 0, 0), (0, 5, 5)), (4, 4, 4))
    with pytest.raises(VolumeError, match="outside the grid"):
        BlockGrid(Box.from_shape((10, 10, 10)), (4, 4, 4)).index_of(27)
    with pytest.raises(VolumeError, match="outside the grid"):
        BlockGrid(Box.from_shape((10, 10, 10)), (4, 4, 4)).block_id((0, 3, 0))
