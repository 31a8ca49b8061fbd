"""Ground-truth labels: objects -> dense nodes -> per-voxel segment ids and compartments.

Why this construction (and not "nearest surface wins"): with nearest-surface assignment a thin axon passing through
a thick dendrite is cut in two. Here every object owns a *core set* and voxels go to the nearest core (a Voronoi
diagram of connected sets, whose cells are star-shaped around their site, hence connected), capped at a thin shell:

1. axis voxels: each object's skeleton rasterized 6-connected (thin objects win collisions, so thin chains never break);
2. cores: a voxel whose nearest axis voxel belongs to node q is core of q's object if closer than radius(q) - core_nm
   (Voronoi of axes restricted to a radius: star-shaped, connected); somata add their ball where nothing else is;
3. labels: nearest core, if within core_nm + gap_nm (+ glia_fill_nm for glia, which makes glia fill the interstices
   as thin sheets); farther voxels are extracellular space (0).

Objects are clipped to the volume (`params.shape_zyx`): only nodes inside it are rasterized, and the tree of inside
nodes may fall apart into runs, each its own segment (id = object key << 10 | run). Everything is a function of
global positions, so any box computed with enough padding (`label_pad_voxels`) agrees with any other box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.synthetic.morphology import GLIA, MAX_RADIUS_NM, SOMA, Obj
from pipeline.synthetic.params import SynthParams


@dataclass
class Nodes:
    """Dense nodes of the objects near a box (positions nm ZYX) and the segments (runs inside the volume).

    Only skeleton edges near the box are densified; which run (segment) a node belongs to is decided on the object's
    control points, which every block sees whole, so segment ids agree between blocks.
    """

    pos: np.ndarray         # (N, 3) float64
    radius: np.ndarray      # (N,) float32
    comp: np.ndarray        # (N,) uint8 compartment
    parent: np.ndarray      # (N,) int64 previous node on the same edge, or -1
    obj: np.ndarray         # (N,) int32 index into objects
    seg: np.ndarray         # (N,) int32 index into seg_ids, -1 outside the volume
    inside: np.ndarray      # (N,) bool
    is_soma: np.ndarray     # (N,) bool (the virtual soma node: centre of the ball)
    spine: np.ndarray       # (N,) bool, node of a spine
    sub: np.ndarray         # (N,) int32 position along its edge (for block-independent subsampling)
    seg_ids: np.ndarray     # (S,) uint64
    seg_type: list[str]     # (S,) cell type
    objects: list[Obj]
    ctrl_seg: list[list[np.ndarray]]  # per object, per chain: segment index of each control point (-1 outside)


def _cap_max(params: SynthParams) -> float:
    return params.core_nm + params.gap_nm + params.glia_fill_nm


def coarse_factor(params: SynthParams) -> np.ndarray:
    """Stage 1 (cores) runs on a coarser grid of ~32 nm voxels, globally aligned: 16x fewer voxels at 8x8x40."""
    return np.maximum(1, np.rint(32.0 / np.array(params.voxel_size_zyx))).astype(np.int64)


def _pads(params: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """(stage-2 pad, stage-1 pad) in ZYX voxels: features within reach of the inner box must be inside."""
    vs = np.array(params.voxel_size_zyx)
    vc = vs * coarse_factor(params)
    p2 = np.ceil((_cap_max(params) + vs.max()) / vs).astype(np.int64) + 1
    p1 = (np.ceil((MAX_RADIUS_NM - params.core_nm + 2 * vc.max()) / vc).astype(np.int64) + 1) * coarse_factor(params)
    return p2, p1


def label_pad_voxels(params: SynthParams) -> tuple[int, int, int]:
    """Padding (ZYX voxels) so that labels in the inner box do not depend on the padded box's extent."""
    p2, p1 = _pads(params)
    return tuple(int(v) for v in p1 + p2 + coarse_factor(params))  # type: ignore[return-value]


def _segment_hits_box(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Do segments a[k]-b[k] meet the box [lo, hi)? (slab test, vectorized)"""
    d = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo - a) / d
        t1 = (hi - a) / d
    tmin = np.where(d != 0, np.minimum(t0, t1), np.where((a >= lo) & (a < hi), -np.inf, np.inf))
    tmax = np.where(d != 0, np.maximum(t0, t1), np.where((a >= lo) & (a < hi), np.inf, -np.inf))
    enter = np.maximum(tmin.max(1), 0.0)
    leave = np.minimum(tmax.min(1), 1.0)
    return enter < leave


def _object_graph(obj: Obj):
    """Control points of all chains, concatenated, and the edges between them (incl. chain attachments)."""
    offs, pts, rad, comp, spine, chain_of = [], [], [], [], [], []
    n = 0
    for ci, ch in enumerate(obj.chains):
        offs.append(n)
        pts.append(ch.points)
        rad.append(ch.radius)
        comp.append(np.full(len(ch.points), ch.compartment, np.uint8))
        spine.append(np.full(len(ch.points), ch.spine_head))
        chain_of.append(np.full(len(ch.points), ci))
        n += len(ch.points)
    ea, eb = [], []
    for ci, ch in enumerate(obj.chains):
        k = np.arange(len(ch.points)) + offs[ci]
        ea.append(k[:-1])
        eb.append(k[1:])
        if ch.parent is not None:
            ea.append(np.array([offs[ch.parent[0]] + ch.parent[1]]))
            eb.append(np.array([offs[ci]]))
    return (np.concatenate(pts), np.concatenate(rad), np.concatenate(comp), np.concatenate(spine),
            np.concatenate(ea).astype(np.int64), np.concatenate(eb).astype(np.int64), offs)


def build_nodes(params: SynthParams, objects: list[Obj], lo_nm: np.ndarray, hi_nm: np.ndarray) -> Nodes:
    """Dense nodes of every skeleton edge that comes within MAX_RADIUS_NM of [lo_nm, hi_nm)."""
    vs = np.array(params.voxel_size_zyx)
    ds = float(vs.min()) / 2.0
    vol_hi = np.array(params.shape_zyx) * vs
    box_lo, box_hi = np.asarray(lo_nm) - MAX_RADIUS_NM, np.asarray(hi_nm) + MAX_RADIUS_NM
    cols: dict[str, list] = {k: [] for k in ("pos", "rad", "comp", "par", "obj", "seg", "ins", "som", "sp", "sub")}
    seg_ids: list[int] = []
    seg_type: list[str] = []
    ctrl_seg_all: list[list[np.ndarray]] = []
    offset = 0
    for oi, obj in enumerate(objects):
        pts, rad, comp, spine, ea, eb, offs = _object_graph(obj)
        nc = len(pts)
        soma = obj.soma_center is not None
        inside = np.all((pts >= 0) & (pts < vol_hi), axis=1)
        if soma:  # control point 0 is the soma centre: inside when its ball meets the volume
            nearest = np.clip(obj.soma_center, 0, vol_hi)
            inside[0] = np.linalg.norm(nearest - obj.soma_center) < obj.soma_radius - params.core_nm
        both = inside[ea] & inside[eb]
        # edges with both ends outside that still cross the volume are pieces of their own
        cand = ~inside[ea] & ~inside[eb]
        crossing = np.zeros(len(ea), bool)
        if cand.any():
            crossing[cand] = _segment_hits_box(pts[ea[cand]], pts[eb[cand]], np.zeros(3), vol_hi)
        n_el = nc + len(ea)
        g = coo_matrix((np.ones(int(both.sum())), (ea[both], eb[both])), shape=(n_el, n_el))
        _, lab = connected_components(g, directed=False)
        elements = np.concatenate([np.nonzero(inside)[0], nc + np.nonzero(crossing)[0]])
        run_of_el = np.full(n_el, -1, np.int64)
        if len(elements):
            labs = lab[elements]
            uniq, inv = np.unique(labs, return_inverse=True)
            first = np.full(len(uniq), np.iinfo(np.int64).max)
            np.minimum.at(first, inv, elements)
            rank = np.argsort(np.argsort(first))
            base = len(seg_ids)
            for r in range(len(uniq)):
                seg_ids.append((obj.key << 10) | min(int(r), 1023))
                seg_type.append(obj.cell_type)
            run_of_el[elements] = base + rank[inv]
        ctrl_seg_all.append([run_of_el[offs[ci]:offs[ci] + len(ch.points)] for ci, ch in enumerate(obj.chains)])
        # densify the edges near the box
        if soma and inside[0]:
            cols["pos"].append(obj.soma_center[None].astype(float))
            cols["rad"].append(np.array([obj.soma_radius]))
            cols["comp"].append(np.array([SOMA], np.uint8))
            cols["par"].append(np.array([-1]))
            cols["obj"].append(np.array([oi], np.int32))
            cols["seg"].append(np.array([run_of_el[0]], np.int32))
            cols["ins"].append(np.array([True]))
            cols["som"].append(np.array([True]))
            cols["sp"].append(np.array([False]))
            cols["sub"].append(np.array([0], np.int32))
            offset += 1
        near = _segment_hits_box(pts[ea], pts[eb], box_lo, box_hi)
        for e in np.nonzero(near)[0]:
            a, b = ea[e], eb[e]
            seg_len = float(np.linalg.norm(pts[b] - pts[a]))
            m = max(1, int(np.ceil(seg_len / ds)))
            t = np.arange(m + 1) / m
            p = pts[a] + (pts[b] - pts[a]) * t[:, None]
            r = rad[a] + (rad[b] - rad[a]) * t
            if soma and a == 0:  # from the soma centre outwards the branch has its own radius
                r = np.full(m + 1, rad[b])
            ins = np.all((p >= 0) & (p < vol_hi), axis=1)
            run = run_of_el[a] if inside[a] else (run_of_el[b] if inside[b] else run_of_el[nc + e])
            if inside[a] and inside[b]:
                sg = np.full(m + 1, run_of_el[a])
            else:
                sg = np.where(ins, run, -1)
            keep = ~(soma & (a == 0)) | (np.arange(m + 1) > 0)
            cols["pos"].append(p)
            cols["rad"].append(r)
            cols["comp"].append(np.full(m + 1, comp[b], np.uint8))
            par = offset + np.arange(m + 1) - 1
            par[0] = -1
            cols["par"].append(par)
            cols["obj"].append(np.full(m + 1, oi, np.int32))
            cols["seg"].append(sg.astype(np.int32))
            cols["ins"].append(ins & (sg >= 0) & keep)
            cols["som"].append(np.zeros(m + 1, bool))
            cols["sp"].append(np.full(m + 1, spine[b]))
            cols["sub"].append(np.arange(m + 1, dtype=np.int32))
            offset += m + 1
    if offset == 0:
        z = np.zeros(0)
        return Nodes(np.zeros((0, 3)), z.astype(np.float32), z.astype(np.uint8), z.astype(np.int64),
                     z.astype(np.int32), z.astype(np.int32), z.astype(bool), z.astype(bool), z.astype(bool),
                     z.astype(np.int32), np.array(seg_ids, dtype=np.uint64), seg_type, objects, ctrl_seg_all)
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    return Nodes(cat["pos"], cat["rad"].astype(np.float32), cat["comp"], cat["par"].astype(np.int64), cat["obj"],
                 cat["seg"], cat["ins"], cat["som"], cat["sp"], cat["sub"], np.array(seg_ids, dtype=np.uint64),
                 seg_type, objects, ctrl_seg_all)


def _raster(nodes: Nodes, vs: np.ndarray, start: np.ndarray, shape: np.ndarray, connect: bool = True,
            ok: np.ndarray | None = None) -> np.ndarray:
    """Axis voxels (node index per voxel, -1 none) in the box (voxel size `vs`), 6-connected along every edge."""
    if ok is None:
        ok = nodes.inside & ~nodes.is_soma
    vox = np.floor(nodes.pos / vs).astype(np.int64)
    idx = np.nonzero(ok)[0]
    extra_v, extra_i = [], []
    par = nodes.parent
    ch = idx[(par[idx] >= 0)]
    ch = ch[ok[par[ch]]]
    d = vox[ch] - vox[par[ch]]
    diag = np.abs(d).sum(1) > 1
    c2, d2 = ch[diag], d[diag]
    base = vox[par[c2]]
    for mask in ((1, 0, 0), (1, 1, 0)) if connect else ():
        v = base + d2 * np.array(mask)
        extra_v.append(v)
        extra_i.append(c2)
    allv = np.concatenate([vox[idx]] + extra_v)
    alli = np.concatenate([idx] + extra_i)
    rel = allv - start
    keep = np.all((rel >= 0) & (rel < shape), axis=1)
    rel, alli = rel[keep], alli[keep]
    out = np.full(tuple(shape), -1, np.int64)
    if len(alli) == 0:
        return out
    flat = np.ravel_multi_index(rel.T, tuple(shape))
    # thin wins: sort by radius descending, object key, node index; the last write per voxel is kept
    keys = np.array([o.key for o in nodes.objects], dtype=np.uint64)[nodes.obj[alli]]
    order = np.lexsort((alli, keys, -nodes.radius[alli]))
    flat, alli = flat[order], alli[order]
    rev_u, rev_first = np.unique(flat[::-1], return_index=True)
    out.ravel()[rev_u] = alli[::-1][rev_first]
    if connect:
        _detour_collisions(out, flat, alli, nodes.obj)
    return out


_STEPS = np.array([(0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (1, 0, 0), (-1, 0, 0)], np.int64)


def _detour_collisions(out: np.ndarray, flat: np.ndarray, node: np.ndarray, node_obj: np.ndarray) -> None:
    """Where a thicker chain lost an axis voxel to another object, route it around that voxel.

    Two skeletons passing within a voxel would otherwise cut the loser in two. The loser's neighbours along its chain
    are 6-neighbours of the lost voxel v, so claiming w = v + e and w's free 6-neighbours keeps it 6-connected.
    Depends only on the raster near v, so it is the same in every box that contains v with a margin.
    """
    shape = np.array(out.shape)
    win_obj = node_obj[out.ravel()[flat]]
    lost = win_obj != node_obj[node]
    if not lost.any():
        return
    pairs = np.unique(np.stack([flat[lost], node[lost]], 1), axis=0)
    for f, n in pairs:
        v = np.array(np.unravel_index(int(f), out.shape))
        mine = node_obj[n]
        for e in _STEPS:
            w = v + e
            ring = w + _STEPS
            ring = ring[np.any(ring != v, axis=1)]
            pts = np.concatenate([w[None], ring])
            if np.any(pts < 0) or np.any(pts >= shape):
                continue
            cur = out[tuple(pts.T)]
            if np.all((cur < 0) | (node_obj[np.maximum(cur, 0)] == mine)):
                free = cur < 0
                out[tuple(pts[free].T)] = n
                break


def compute_labels(nodes: Nodes, params: SynthParams, start, shape) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the box [start, start+shape) (global voxels, ZYX); pads internally (see `_pads`).

    Returns (segment index per voxel, -1 for extracellular; node index of the owning core, -1 there too).
    """
    vs = np.array(params.voxel_size_zyx)
    p2, p1 = _pads(params)
    start = np.asarray(start, np.int64)
    shape = np.asarray(shape, np.int64)
    s2, n2 = start - p2, shape + 2 * p2          # stage-2 box (fine)
    f = coarse_factor(params)
    vc = vs * f
    c_lo = (s2 - p1) // f                        # stage-1 box (coarse, globally aligned)
    c_hi = -(-(s2 + n2 + p1) // f)
    thick = nodes.inside & ~nodes.is_soma & (nodes.radius - params.core_nm >= vc.max())
    axis_c = _raster(nodes, vc, c_lo, c_hi - c_lo, connect=False)
    core = np.full(tuple(n2), -1, np.int64)
    if (axis_c >= 0).any() and thick.any():
        d1, ind = ndi.distance_transform_edt(axis_c < 0, sampling=vc, return_indices=True)
        near = axis_c[tuple(ind)]
        del ind
        core_c = np.where((d1 < nodes.radius[near] - params.core_nm) & thick[near], near, -1)
        del d1, near
        take = [(np.arange(a, a + n) // ff) - lo for a, n, ff, lo in zip(s2, n2, f, c_lo)]
        core = core_c[np.ix_(*take)]
    axis = _raster(nodes, vs, s2 - 3, n2 + 6)[3:-3, 3:-3, 3:-3]  # margin: detours look 2 voxels around
    core[axis >= 0] = axis[axis >= 0]
    del axis
    # somata: their ball, where no other core is
    vol_hi = np.array(params.shape_zyx)
    for s in np.nonzero(nodes.is_soma & nodes.inside)[0]:
        c = nodes.pos[s]
        rc = float(nodes.radius[s]) - params.core_nm
        lo = np.maximum(np.floor((c - rc) / vs).astype(np.int64), np.maximum(s2, 0))
        hi = np.minimum(np.ceil((c + rc) / vs).astype(np.int64) + 1, np.minimum(s2 + n2, vol_hi))
        if np.any(hi <= lo):
            continue
        zz, yy, xx = ((np.arange(a, b) + 0.5) * v - cc for a, b, v, cc in zip(lo, hi, vs, c))
        ball = zz[:, None, None] ** 2 + yy[None, :, None] ** 2 + xx[None, None, :] ** 2 < rc * rc
        sub = core[tuple(slice(a - s0, b - s0) for a, b, s0 in zip(lo, hi, s2))]
        sub[ball & (sub < 0)] = s
    # features only inside the volume: then every voxel's path to its feature stays inside (the volume is convex)
    core[~_inside_volume_mask(params, s2, n2)] = -1
    crop = tuple(slice(int(a), int(a + n)) for a, n in zip(p2, shape))
    if not (core >= 0).any():
        return np.full(tuple(shape), -1, np.int32), np.full(tuple(shape), -1, np.int64)
    d2, ind = ndi.distance_transform_edt(core < 0, sampling=vs, return_indices=True)
    owner = core[tuple(ind[(slice(None),) + crop])]
    d2 = d2[crop]
    del ind
    cap = params.core_nm + params.gap_nm + np.where(nodes.comp[owner] == GLIA, params.glia_fill_nm, 0.0)
    ok = (d2 < cap) & _inside_volume_mask(params, start, shape)
    seg = np.where(ok, nodes.seg[owner], -1).astype(np.int32)
    owner = np.where(ok, owner, -1)
    return seg, owner


def _inside_volume_mask(params: SynthParams, start, shape) -> np.ndarray:
    hi = np.array(params.shape_zyx)
    axes = [((np.arange(s, s + n) >= 0) & (np.arange(s, s + n) < h)) for s, n, h in zip(start, shape, hi)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
