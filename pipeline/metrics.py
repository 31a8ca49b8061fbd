"""Segmentation quality against ground truth: VOI split/merge, adapted Rand error, split/merge counts, ERL.

All figures come from one sparse contingency table (overlap counts of (segmentation id, ground-truth id) pairs),
so a 256^3 volume scores in about a second.

Conventions (those of the CREMI challenge code, which came from gala):
- Ground-truth id 0 is *ignored*: voxels with gt == 0 are left out of every figure (`ignore_gt_zero=True`).
- VOI is in **bits** (log2). `voi_split` = H(seg | gt) (false splits), `voi_merge` = H(gt | seg) (false merges),
  `voi` = their sum. Segmentation id 0 is an ordinary label for VOI, as in CREMI.
- ARAND = 1 - F-score of the Rand index restricted to gt foreground (SNEMI3D/CREMI "adapted Rand error"); voxels a
  segmentation leaves at 0 count as singletons (each its own segment), so leaving things unlabelled is not free.
- Split/merge counts: `splits` = sum over gt segments of (number of segmentation segments overlapping it by at least
  `min_overlap` voxels - 1); `merges` = the same with the roles swapped (segmentation 0 never counts as a merger).
- ERL (expected run length, nm) on ground-truth skeletons (kimimaro): a skeleton edge is correct when both ends
  carry the same non-zero segmentation id that touches no other ground-truth skeleton; ERL = sum over runs of
  correct edges of length^2 / total skeleton length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import fastremap
import numpy as np

from storage.errors import ConnectomeError


@dataclass(frozen=True)
class Contingency:
    """Non-zero overlap counts: seg[k], gt[k] (original ids) overlap on counts[k] voxels (gt 0 removed if asked)."""

    seg: np.ndarray
    gt: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def contingency(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool = True) -> Contingency:
    if seg.shape != gt.shape:
        raise ConnectomeError(f"segmentation shape {seg.shape} differs from ground truth shape {gt.shape} (zyx)")
    s = np.ascontiguousarray(seg).ravel()
    g = np.ascontiguousarray(gt).ravel()
    if ignore_gt_zero:
        keep = g != 0
        s, g = s[keep], g[keep]
    if s.size == 0:
        z = np.zeros(0, np.uint64)
        return Contingency(z, z, np.zeros(0, np.int64))
    s_dense, s_map = fastremap.renumber(s, start=0, preserve_zero=False)
    g_dense, g_map = fastremap.renumber(g, start=0, preserve_zero=False)
    key = (s_dense.astype(np.uint64) << np.uint64(32)) | g_dense.astype(np.uint64)
    pairs, counts = np.unique(key, return_counts=True)
    s_inv = np.zeros(len(s_map), np.uint64)
    for orig, new in s_map.items():
        s_inv[new] = orig
    g_inv = np.zeros(len(g_map), np.uint64)
    for orig, new in g_map.items():
        g_inv[new] = orig
    return Contingency(s_inv[(pairs >> np.uint64(32)).astype(np.int64)],
                       g_inv[(pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)], counts.astype(np.int64))


def _sums(keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    _, inv = np.unique(keys, return_inverse=True)
    return np.bincount(inv, weights=counts)


def voi(t: Contingency) -> tuple[float, float]:
    """(voi_split, voi_merge) in bits."""
    n = t.total
    if n == 0:
        return 0.0, 0.0
    p = t.counts / n
    _, s_inv = np.unique(t.seg, return_inverse=True)
    _, g_inv = np.unique(t.gt, return_inverse=True)
    ps = np.bincount(s_inv, weights=p)[s_inv]
    pg = np.bincount(g_inv, weights=p)[g_inv]
    # written as sums of p * log(p / marginal) so that a perfect segmentation scores exactly 0
    split = max(0.0, -float(np.sum(p * np.log2(p / pg))))   # H(seg | gt)
    merge = max(0.0, -float(np.sum(p * np.log2(p / ps))))   # H(gt | seg)
    return float(split), float(merge)


def adapted_rand_error(t: Contingency) -> tuple[float, float, float]:
    """(arand, precision, recall); seg 0 voxels count as singletons."""
    if t.total == 0:
        return 0.0, 1.0, 1.0
    zero = t.seg == 0
    c = t.counts.astype(np.float64)
    sum_gt = np.sum(_sums(t.gt, c) ** 2)
    labelled = ~zero
    sum_seg = np.sum(_sums(t.seg[labelled], c[labelled]) ** 2) + c[zero].sum() if labelled.any() else c[zero].sum()
    sum_joint = np.sum(c[labelled] ** 2) + c[zero].sum()
    precision = sum_joint / sum_seg
    recall = sum_joint / sum_gt
    f = 2 * precision * recall / (precision + recall)
    return float(1.0 - f), float(precision), float(recall)


def split_merge_counts(t: Contingency, min_overlap: int = 1) -> tuple[int, int]:
    keep = t.counts >= min_overlap
    seg, gt = t.seg[keep], t.gt[keep]
    _, per_gt = np.unique(gt, return_counts=True)
    splits = int(np.sum(per_gt - 1))
    nz = seg != 0
    _, per_seg = np.unique(seg[nz], return_counts=True)
    merges = int(np.sum(per_seg - 1))
    return splits, merges


@dataclass(frozen=True)
class Scores:
    voi: float
    voi_split: float
    voi_merge: float
    arand: float
    precision: float
    recall: float
    splits: int
    merges: int
    segments: int          # segmentation segments over gt foreground (0 excluded)
    gt_segments: int
    erl_nm: float | None = None
    gt_erl_nm: float | None = None   # ERL of the ground truth itself (the ceiling)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(seg: np.ndarray, gt: np.ndarray, *, ignore_gt_zero: bool = True, min_overlap: int = 1,
             voxel_size_xyz_nm: Sequence[float] | None = None, erl: bool = False) -> Scores:
    """All figures at once. `erl=True` skeletonizes the ground truth (kimimaro; needs `voxel_size_xyz_nm`)."""
    t = contingency(seg, gt, ignore_gt_zero)
    split, merge = voi(t)
    are, prec, rec = adapted_rand_error(t)
    splits, merges = split_merge_counts(t, min_overlap)
    segs = np.unique(t.seg)
    e = g = None
    if erl:
        skels = gt_skeletons(gt, voxel_size_xyz_nm or (1.0, 1.0, 1.0))
        e = expected_run_length(seg, skels, voxel_size_xyz_nm or (1.0, 1.0, 1.0))
        g = expected_run_length(gt, skels, voxel_size_xyz_nm or (1.0, 1.0, 1.0))
    return Scores(split + merge, split, merge, are, prec, rec, splits, merges, int(np.count_nonzero(segs)),
                  int(len(np.unique(t.gt))), e, g)


# ---------------------------------------------------------------------------------------------------------------
# ERL on ground-truth skeletons
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skeleton:
    segment_id: int
    vertices_zyx: np.ndarray   # (n, 3) int voxel indices
    edges: np.ndarray          # (m, 2)
    edge_nm: np.ndarray        # (m,) lengths


def gt_skeletons(gt: np.ndarray, voxel_size_xyz_nm: Sequence[float], scale: float = 1.5, const_nm: float = 300.0,
                 dust_voxels: int = 100) -> list[Skeleton]:
    """TEASAR skeletons of every ground-truth segment (kimimaro), vertices snapped to voxels."""
    import kimimaro

    vs = np.asarray(voxel_size_xyz_nm, float)
    labels_xyz = np.asfortranarray(np.asarray(gt).transpose(2, 1, 0))
    skels = kimimaro.skeletonize(labels_xyz, teasar_params={"scale": scale, "const": const_nm},
                                 anisotropy=tuple(vs), dust_threshold=dust_voxels, fix_branching=True,
                                 progress=False, parallel=1)
    out = []
    hi = np.array(gt.shape)[::-1] - 1
    for sid in sorted(skels):
        s = skels[sid]
        if len(s.edges) == 0:
            continue
        v_xyz = np.clip(np.rint(s.vertices / vs).astype(np.int64), 0, hi)
        e = np.asarray(s.edges, np.int64)
        length = np.linalg.norm(s.vertices[e[:, 0]] - s.vertices[e[:, 1]], axis=1)
        out.append(Skeleton(int(sid), v_xyz[:, ::-1].copy(), e, length))
    return out


def expected_run_length(seg: np.ndarray, skeletons: list[Skeleton], voxel_size_xyz_nm=None) -> float:
    """ERL (nm) of `seg` along ground-truth skeletons; merged segments contribute nothing."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not skeletons:
        return 0.0
    labels = [seg[tuple(s.vertices_zyx.T)] for s in skeletons]
    owners: dict[int, set[int]] = {}
    for s, lab in zip(skeletons, labels):
        for v in np.unique(lab):
            if v != 0:
                owners.setdefault(int(v), set()).add(s.segment_id)
    merged = {v for v, o in owners.items() if len(o) > 1}
    total = 0.0
    acc = 0.0
    for s, lab in zip(skeletons, labels):
        total += float(s.edge_nm.sum())
        a, b = lab[s.edges[:, 0]], lab[s.edges[:, 1]]
        ok = (a == b) & (a != 0)
        if merged:
            ok &= ~np.isin(a, np.fromiter(merged, dtype=a.dtype, count=len(merged)))
        if not ok.any():
            continue
        e = s.edges[ok]
        n = len(s.vertices_zyx)
        g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
        _, comp = connected_components(g, directed=False)
        run = np.bincount(comp[e[:, 0]], weights=s.edge_nm[ok])
        acc += float(np.sum(run ** 2))
    return acc / total if total > 0 else 0.0
