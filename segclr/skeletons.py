"""Skeletons for SegCLR: kimimaro per block, merged per segment, as plain arrays in nm.

Why blockwise: a volume too large for one process is skeletonized one block at a time. Border handling follows
igneous: each block reads its write box plus ONE voxel past its far faces, so face-adjacent blocks share a plane
of voxels, and kimimaro's ``fix_borders`` places a skeleton endpoint at the same position on that shared plane
from both sides. Merging then fuses vertices with identical coordinates; any pieces that still fail to meet
(e.g. a branch that only grazes the plane) are joined at their closest vertices when they are closer than
``join_radius_nm``. The result is one skeleton graph per segment with nodes in nm XYZ and radii in nm.

Pure science: no stores, no Dask; ``pipeline/stages/skeletonize.py`` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, breadth_first_order

from storage.box import Box

DEFAULT_TEASAR = {
    "scale": 1.5, "const": 300, "pdrf_scale": 100000, "pdrf_exponent": 4,
    "soma_acceptance_threshold": 3500, "soma_detection_threshold": 750,
    "soma_invalidation_const": 300, "soma_invalidation_scale": 2,
}


@dataclass
class Skeleton:
    """One segment's skeleton: vertices (N, 3) nm XYZ, undirected edges (E, 2) vertex indices, radii (N,) nm."""

    vertices: np.ndarray
    edges: np.ndarray
    radii: np.ndarray
    attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, np.float64).reshape(-1, 3)
        self.edges = np.asarray(self.edges, np.int64).reshape(-1, 2)
        self.radii = np.asarray(self.radii, np.float64).reshape(-1)

    def __len__(self) -> int:
        return len(self.vertices)

    def graph(self) -> sp.csr_matrix:
        """Symmetric sparse graph weighted by edge length in nm (for geodesic distances)."""
        n = len(self.vertices)
        if len(self.edges) == 0:
            return sp.csr_matrix((n, n))
        a, b = self.edges[:, 0], self.edges[:, 1]
        w = np.linalg.norm(self.vertices[a] - self.vertices[b], axis=1)
        w = np.maximum(w, 1e-6)  # csgraph treats explicit 0 as "no edge"
        g = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n))
        return g.tocsr()

    def num_components(self) -> int:
        return int(connected_components(self.graph(), directed=False)[0]) if len(self) else 0

    def cable_length(self) -> float:
        if len(self.edges) == 0:
            return 0.0
        return float(np.linalg.norm(self.vertices[self.edges[:, 0]] - self.vertices[self.edges[:, 1]], axis=1).sum())

    def parents(self) -> np.ndarray:
        """Parent index per vertex (-1 at roots): BFS trees rooted at each component's thickest vertex (the soma
        when there is one), so the store's ``parent`` column describes a forest."""
        n = len(self)
        parent = np.full(n, -1, np.int64)
        if n == 0:
            return parent
        g = self.graph()
        ncomp, comp = connected_components(g, directed=False)
        for c in range(ncomp):
            members = np.flatnonzero(comp == c)
            root = members[np.argmax(self.radii[members])]
            _, pred = breadth_first_order(g, root, directed=False, return_predecessors=True)
            sel = members[members != root]
            parent[sel] = pred[sel]
        return parent


def skeletonize_region(
    seg: np.ndarray,
    origin_zyx: Sequence[int],
    voxel_size_nm: Sequence[float],
    *,
    teasar_params: dict | None = None,
    dust_threshold: int = 100,
    fix_borders: bool = True,
) -> dict[int, Skeleton]:
    """kimimaro on one ZYX uint64 region whose first voxel is scale-0 voxel ``origin_zyx`` -> {id: Skeleton}.

    Vertices are in volume nm: ``(voxel + origin) * voxel_size`` in XYZ.
    """
    import kimimaro

    vs = np.asarray(voxel_size_nm, np.float64)
    labels = np.asarray(seg).T  # XYZ view (Fortran order), what kimimaro expects
    if not labels.any():
        return {}
    skels = kimimaro.skeletonize(
        labels, teasar_params=dict(DEFAULT_TEASAR, **(teasar_params or {})), anisotropy=tuple(vs),
        dust_threshold=int(dust_threshold), progress=False, fix_branching=True, fix_borders=fix_borders,
        parallel=1,
    )
    offset_nm = np.asarray(origin_zyx, np.float64)[::-1] * vs
    out = {}
    for sid, sk in skels.items():
        out[int(sid)] = Skeleton(np.asarray(sk.vertices, np.float64) + offset_nm, np.asarray(sk.edges),
                                 np.asarray(sk.radius, np.float64))
    return out


def block_read_box(write: Box, bounds: Box) -> Box:
    """Write box + one voxel past the far faces (clipped): face neighbours share one plane of voxels."""
    return Box(write.start, tuple(min(s + 1, b) for s, b in zip(write.stop, bounds.stop))).intersect(bounds)


def merge_skeletons(pieces: Iterable[Skeleton], *, join_radius_nm: float = 0.0, decimals: int = 3) -> Skeleton:
    """Fuse pieces of one segment: identical vertices become one, edges are unioned, then components closer than
    ``join_radius_nm`` are joined by an edge between their closest vertices (0 disables joining)."""
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        return Skeleton(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros(0))
    verts = np.concatenate([p.vertices for p in pieces])
    radii = np.concatenate([p.radii for p in pieces])
    offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    edges = np.concatenate([p.edges + o for p, o in zip(pieces, offsets)])
    # deterministic vertex order: lexicographic by (z, y, x) of the rounded position
    key = np.round(verts, decimals)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((uniq[:, 0], uniq[:, 1], uniq[:, 2]))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    new_index = rank[inverse]
    n = len(uniq)
    vertices = uniq[order]
    r = np.zeros(n)
    np.maximum.at(r, new_index, radii)
    e = new_index[edges]
    e = e[e[:, 0] != e[:, 1]]
    e = np.unique(np.sort(e, axis=1), axis=0) if len(e) else e.reshape(0, 2)
    sk = Skeleton(vertices, e, r)
    if join_radius_nm > 0:
        sk = join_components(sk, join_radius_nm)
    return sk


def join_components(sk: Skeleton, radius_nm: float) -> Skeleton:
    """Repeatedly link the two closest components (closest vertex pair) while they are within ``radius_nm``."""
    from scipy.spatial import cKDTree

    edges = [tuple(e) for e in sk.edges]
    while True:
        cur = Skeleton(sk.vertices, np.asarray(edges, np.int64).reshape(-1, 2), sk.radii)
        ncomp, comp = connected_components(cur.graph(), directed=False)
        if ncomp <= 1:
            return cur
        best = None
        for c in range(ncomp):
            inside = np.flatnonzero(comp == c)
            outside = np.flatnonzero(comp != c)
            d, j = cKDTree(sk.vertices[outside]).query(sk.vertices[inside])
            k = int(np.argmin(d))
            if best is None or d[k] < best[0]:
                best = (float(d[k]), int(inside[k]), int(outside[j[k]]))
        if best[0] > radius_nm:
            return cur
        edges.append((min(best[1], best[2]), max(best[1], best[2])))


def subsample_nodes(sk: Skeleton, spacing_nm: float) -> np.ndarray:
    """Indices of vertices kept for embedding: one per ``spacing_nm`` cube (the vertex closest to the cube's
    centre). Deterministic and cheap; 0 keeps every vertex."""
    n = len(sk)
    if n == 0 or spacing_nm <= 0:
        return np.arange(n)
    cell = np.floor(sk.vertices / spacing_nm).astype(np.int64)
    centre = (cell + 0.5) * spacing_nm
    dist = np.linalg.norm(sk.vertices - centre, axis=1)
    order = np.lexsort((np.arange(n), dist, cell[:, 0], cell[:, 1], cell[:, 2]))
    c = cell[order]
    first = np.ones(n, bool)
    first[1:] = np.any(c[1:] != c[:-1], axis=1)
    return np.sort(order[first])


# ---- tables: the store's skeleton_nodes layout ---------------------------------------------------------------------

def skeletons_to_table(skeletons: dict[int, Skeleton]):
    """{id: Skeleton} -> DataFrame with the store's ``skeleton_nodes`` columns (node ids 0..N-1 per segment,
    integer nm positions, ``parent_id`` NaN at roots)."""
    import pandas as pd

    parts = []
    for sid in sorted(skeletons):
        sk = skeletons[sid]
        if len(sk) == 0:
            continue
        parent = sk.parents().astype(float)
        parent[parent < 0] = np.nan
        v = np.rint(sk.vertices).astype(np.int64)
        parts.append(pd.DataFrame({
            "segment_id": np.full(len(sk), sid, np.int64), "node_id": np.arange(len(sk), dtype=np.int64),
            "x_nm": v[:, 0].astype(np.int32), "y_nm": v[:, 1].astype(np.int32), "z_nm": v[:, 2].astype(np.int32),
            "radius_nm": sk.radii.astype(np.float32), "parent_id": pd.array(parent, dtype="Int64"),
        }))
    if not parts:
        return pd.DataFrame({c: [] for c in ("segment_id", "node_id", "x_nm", "y_nm", "z_nm", "radius_nm",
                                             "parent_id")})
    return pd.concat(parts, ignore_index=True)


def table_to_skeletons(df) -> dict[int, Skeleton]:
    """Inverse of ``skeletons_to_table`` (edges = node -> parent); rows may come in any order."""
    out = {}
    for sid, g in df.groupby("segment_id", sort=True):
        g = g.sort_values("node_id")
        node = g["node_id"].to_numpy(np.int64)
        pos = {int(n): i for i, n in enumerate(node)}
        parent = g["parent_id"].to_numpy(dtype=float, na_value=np.nan)
        edges = [(i, pos[int(p)]) for i, p in enumerate(parent) if np.isfinite(p) and int(p) in pos]
        out[int(sid)] = Skeleton(g[["x_nm", "y_nm", "z_nm"]].to_numpy(np.float64), np.asarray(edges).reshape(-1, 2),
                                 g["radius_nm"].to_numpy(np.float64) if "radius_nm" in g else np.zeros(len(g)),
                                 {"node_id": node})
    return out
