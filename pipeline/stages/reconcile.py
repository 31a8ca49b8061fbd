"""Reconcile block-local fragments into global segment ids.

Each block segments its read box (write box + overlap) on its own, so an object crossing a block face exists as
one fragment in each block. In the overlap both blocks saw the same voxels; two fragments that cover the same
voxels there are the same object. We match them by *both-direction* overlap fractions (a fragment must cover a
large part of the other's overlap voxels and vice versa), which is what stops a merge error in one block from
spreading, then join all matches with one global union-find. The union-find holds only ids, so it runs on the
driver even for very large volumes (igneous's CCL and the FFN paper do the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph


@dataclass(frozen=True)
class MatchThresholds:
    """When two fragments in an overlap are the same object.

    min_voxels: overlap voxels both fragments must share (noise floor).
    min_fraction: n_ab / n_a and n_ab / n_b must both reach this, n_a and n_b counted inside the overlap only.
    """

    min_voxels: int = 50
    min_fraction: float = 0.5


def overlap_table(labels_a: np.ndarray, labels_b: np.ndarray) -> pd.DataFrame:
    """Contingency of two labelings of the same voxels: a, b, n_ab, n_a, n_b (background 0 excluded)."""
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"overlap shapes differ: {labels_a.shape} vs {labels_b.shape}")
    a = labels_a.ravel().astype(np.uint64)
    b = labels_b.ravel().astype(np.uint64)
    fg_a = a != 0
    fg_b = b != 0
    n_a = pd.Series(a[fg_a]).value_counts()
    n_b = pd.Series(b[fg_b]).value_counts()
    both = fg_a & fg_b
    pairs = pd.DataFrame({"a": a[both], "b": b[both]})
    table = pairs.groupby(["a", "b"], sort=True).size().rename("n_ab").reset_index()
    table["n_a"] = n_a.reindex(table["a"]).to_numpy()
    table["n_b"] = n_b.reindex(table["b"]).to_numpy()
    return table


def match_fragments(labels_a: np.ndarray, labels_b: np.ndarray, thresholds: MatchThresholds) -> np.ndarray:
    """Pairs (a, b) of fragment ids judged to be the same object, shape (n, 2) uint64, sorted."""
    table = overlap_table(labels_a, labels_b)
    keep = (
        (table["n_ab"] >= thresholds.min_voxels)
        & (table["n_ab"] >= thresholds.min_fraction * table["n_a"])
        & (table["n_ab"] >= thresholds.min_fraction * table["n_b"])
    )
    return table.loc[keep, ["a", "b"]].to_numpy(dtype=np.uint64)


def build_lookup(fragment_ids: np.ndarray, equivalences: np.ndarray) -> pd.DataFrame:
    """Global union-find: every fragment -> a dense segment id 1..N.

    Segment ids are numbered by the smallest fragment id of each component, so the numbering depends only on
    the fragments and equivalences, not on the order blocks finished in (a rerun gives the same table).
    Equivalences naming unknown fragments are an error: they would silently create segments with no voxels.
    """
    fragment_ids = np.unique(np.asarray(fragment_ids, dtype=np.uint64))
    fragment_ids = fragment_ids[fragment_ids != 0]
    equivalences = np.asarray(equivalences, dtype=np.uint64).reshape(-1, 2)
    if len(equivalences):
        idx = np.searchsorted(fragment_ids, equivalences)
        idx_clipped = np.minimum(idx, max(len(fragment_ids) - 1, 0))
        known = (idx < len(fragment_ids)) & (fragment_ids[idx_clipped] == equivalences)
        if not known.all():
            bad = equivalences[~known.all(axis=1)][0]
            raise ValueError(f"equivalence {bad.tolist()} names a fragment that no block reported")
        rows, cols = idx[:, 0], idx[:, 1]
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    n = len(fragment_ids)
    graph = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    # components are labelled in order of their first (smallest) fragment, since fragment_ids is sorted
    _, first_index, dense = np.unique(component, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_index))
    segment = order[dense].astype(np.uint64) + 1
    return pd.DataFrame({"fragment_id": fragment_ids, "segment_id": segment})


def match_box(block, other, halo, band: float):
    """The part of the two read boxes' overlap where matching happens: the slab of half-width
    ``max(1, round(band * halo))`` around the shared write face (axis-wise), clipped to the overlap.

    Near its read-box border a block sees little context (the FOV runs out of image, objects are cut), so its
    labels there are the least reliable; around the write face both blocks are at least ``halo / 2`` away from
    their borders, and the face is where the final segmentation switches from one block's labels to the other's.
    """
    from storage.box import Box

    shared = block.read.intersect(other.read)
    if shared.empty or band >= 1.0:
        return shared
    axis = next(i for i in range(3) if block.index[i] != other.index[i])
    lo_block = block if block.index[axis] < other.index[axis] else other
    face = lo_block.write.stop[axis]
    half = max(1, int(round(band * halo[axis])))
    start, stop = list(shared.start), list(shared.stop)
    start[axis] = max(start[axis], face - half)
    stop[axis] = min(stop[axis], face + half)
    return Box(tuple(start), tuple(stop))


def reconcile_block(
    block,
    *,
    grid_json: dict,
    work_dir: str,
    stride: int,
    min_voxels: int,
    min_fraction: float,
    match_band: float = 1.0,
    fragments_spec: dict | None = None,
) -> dict:
    """Match this block's fragments with those of its forward face neighbours in the central part of their overlap
    (``match_band`` = fraction of the halo on each side of the face; 1 = the whole overlap); with
    ``fragments_spec``, also fill this block's write-box holes from its neighbours (``fill_holes_from_neighbours``).
    Each neighbour's side file is read once for both."""
    from pipeline.stages.segment import load_side_file, to_global
    from storage.box import BlockGrid

    grid = BlockGrid.from_json(grid_json)
    thresholds = MatchThresholds(min_voxels=min_voxels, min_fraction=min_fraction)
    loaded: dict[int, np.ndarray] = {}

    def labels(block_id: int, box) -> np.ndarray:
        """Global fragment ids of ``box`` (inside that block's read box) from the block's side file."""
        if block_id not in loaded:
            loaded[block_id] = load_side_file(work_dir, block_id)
        local = loaded[block_id][box.relative_to(grid.block(block_id).read).slices]
        return to_global(local, block_id, stride)

    pairs = []
    for other_id in grid.neighbours(block.block_id):
        if other_id < block.block_id:
            continue  # each pair once, handled by the lower id
        shared = match_box(block, grid.block(other_id), grid.halo, match_band)
        if shared.empty:
            continue
        pairs.append(match_fragments(labels(block.block_id, shared), labels(other_id, shared), thresholds))
    found = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.uint64)
    filled = 0
    if fragments_spec is not None:
        filled = fill_holes_from_neighbours(block, grid, labels, fragments_spec)
    return {"equivalences": found.tolist(), "filled_voxels": filled}


def fill_holes_from_neighbours(block, grid, labels, fragments_spec: dict) -> int:
    """Write-box voxels this block left unlabelled take the fragment a neighbour put there (in its read box).

    A block only seeds near its write box, so an object whose seeds all lie in a neighbour's half of the overlap
    is flooded by that neighbour and left at 0 here, although one pass over the whole volume labels it; those
    voxels would be holes at the face. Neighbours are asked in id order, so the result is deterministic and the
    fragments keep their ids (they are already in the lookup table). ``labels(block_id, box)`` gives a block's
    global fragment ids in a box of its read box. Returns the number of voxels filled."""
    from storage.volume import open_volume

    own = labels(block.block_id, block.write)
    holes = own == 0
    if not holes.any():
        return 0
    out = own.copy()
    for other_id in grid.neighbours(block.block_id, faces_only=False):
        shared = block.write.intersect(grid.block(other_id).read)
        if shared.empty:
            continue
        mine_sl = shared.relative_to(block.write).slices
        if not holes[mine_sl].any():
            continue
        theirs = labels(other_id, shared)
        take = holes[mine_sl] & (theirs != 0)
        out[mine_sl][take] = theirs[take]
        holes[mine_sl] &= ~take
    filled = int(np.count_nonzero(out != own))
    if filled:
        open_volume(fragments_spec, mode="r+").write(block.write, out)
    return filled
