"""Positive pairs for contrastive training: two nodes of one segment's skeleton within a geodesic distance.

Why geodesic: SegCLR's positives are two views of the *same cell* nearby along its arbor (the released H01
table caps the path distance); measuring along the skeleton rather than in space keeps two branches that
merely pass close to each other from being treated as "nearby". Negatives are the other pairs in the batch.
The path distance is recorded with every pair (the published pair table carries it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import dijkstra

from segclr.skeletons import Skeleton


@dataclass(frozen=True)
class Pair:
    segment_id: int
    node_a: int
    node_b: int
    distance_nm: float


class PairSampler:
    """Samples pairs uniformly over segments (so large cells don't dominate), then over nodes.

    ``skeletons``: {segment_id: Skeleton}; nodes with no partner within ``max_distance_nm`` are never drawn;
    ``min_distance_nm`` > 0 forbids a node being paired with itself.
    """

    def __init__(self, skeletons: dict[int, Skeleton], max_distance_nm: float, min_distance_nm: float = 0.0,
                 nodes: dict[int, np.ndarray] | None = None):
        self.max_distance_nm = float(max_distance_nm)
        self.min_distance_nm = float(min_distance_nm)
        self._graphs = {}
        self._nodes = {}
        for sid, sk in sorted(skeletons.items()):
            idx = np.arange(len(sk)) if nodes is None or sid not in nodes else np.asarray(nodes[sid])
            if len(idx) < 2:
                continue
            self._graphs[sid] = sk.graph()
            self._nodes[sid] = idx
        self.segment_ids = np.array(sorted(self._graphs), np.uint64)
        if len(self.segment_ids) == 0:
            raise ValueError("no skeleton with at least 2 nodes to draw pairs from")

    def neighbours(self, segment_id: int, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate partner nodes of ``node`` and their geodesic distances (nm), within [min, max]."""
        d = dijkstra(self._graphs[segment_id], directed=False, indices=int(node), limit=self.max_distance_nm)
        cand = self._nodes[segment_id]
        dc = d[cand]
        ok = np.isfinite(dc) & (dc <= self.max_distance_nm) & (dc >= self.min_distance_nm)
        if self.min_distance_nm <= 0:
            ok &= cand != node
        return cand[ok], dc[ok]

    def sample(self, rng: np.random.Generator, n: int, max_tries: int = 20) -> list[Pair]:
        pairs: list[Pair] = []
        tries = 0
        while len(pairs) < n:
            sid = int(self.segment_ids[rng.integers(len(self.segment_ids))])
            a = int(self._nodes[sid][rng.integers(len(self._nodes[sid]))])
            cand, dist = self.neighbours(sid, a)
            if len(cand) == 0:
                tries += 1
                if tries > max_tries * n:
                    raise ValueError(f"cannot find pairs within {self.max_distance_nm} nm; raise max_distance_nm")
                continue
            k = int(rng.integers(len(cand)))
            pairs.append(Pair(sid, a, int(cand[k]), float(dist[k])))
        return pairs
