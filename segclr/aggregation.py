"""Aggregation of node embeddings over a geodesic radius on the skeleton graph.

Why: SegCLR's cell-type classifiers see the mean embedding of all nodes within radius R of a node (Fig. 3 of the
paper; released at 10 um for H01, 25 um for MICrONS); R = 0 is a single, unaggregated node. Distances are
measured along the skeleton (a branch passing close by in space is not "near"); skeletons may hold more
vertices than were embedded, so paths run over all vertices while only embedded ones are averaged.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.csgraph import dijkstra

from segclr.skeletons import Skeleton


def aggregate(skeleton: Skeleton, node_indices: np.ndarray, embeddings: np.ndarray, radius_nm: float,
              chunk: int = 256) -> np.ndarray:
    """(k, d) mean of the embeddings of embedded nodes within geodesic ``radius_nm`` of each embedded node.

    ``node_indices`` (k,) are skeleton vertex indices of the rows of ``embeddings`` (k, d). R <= 0 returns a copy.
    """
    emb = np.asarray(embeddings, np.float64)
    idx = np.asarray(node_indices, np.int64)
    if radius_nm <= 0 or len(idx) == 0:
        return emb.astype(np.float32, copy=True)
    g = skeleton.graph()
    out = np.empty_like(emb)
    for i in range(0, len(idx), chunk):
        d = dijkstra(g, directed=False, indices=idx[i:i + chunk], limit=radius_nm)[:, idx]
        w = (d <= radius_nm).astype(np.float64)  # includes the node itself (distance 0)
        out[i:i + chunk] = (w @ emb) / w.sum(1, keepdims=True)
    return out.astype(np.float32)


def aggregate_segment(embeddings: np.ndarray) -> np.ndarray:
    """Whole-segment mean (R = infinity): one vector per segment for segment-level classifiers."""
    return np.asarray(embeddings, np.float64).mean(0).astype(np.float32)


def aggregate_table(emb_df, skeletons: dict[int, Skeleton], radius_nm: float, dim: int | None = None):
    """Per-node aggregated embeddings for a table with columns segment_id, node_id, e0..e{d-1}
    -> (N, d) array in the table's row order. ``node_id`` is the vertex index, or the skeleton's own
    ``attributes['node_id']`` (sorted) when it was read from a table."""
    cols = [c for c in emb_df.columns if c.startswith("e") and c[1:].isdigit()]
    cols = sorted(cols, key=lambda c: int(c[1:]))[: dim or None]
    x = emb_df[cols].to_numpy(np.float32)
    out = np.empty_like(x)
    for sid, rows in emb_df.groupby("segment_id", sort=False).indices.items():
        sk = skeletons[int(sid)]
        nodes = emb_df["node_id"].to_numpy()[rows]
        if "node_id" in sk.attributes:  # skeletons read from a table: node ids -> vertex positions
            nodes = np.searchsorted(sk.attributes["node_id"], nodes)
        out[rows] = aggregate(sk, nodes, x[rows], radius_nm)
    return out
