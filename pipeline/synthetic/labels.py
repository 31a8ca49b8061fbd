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

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.synthetic.morphology import AXON, GLIA, MAX_RADIUS_NM, MAX_SOMA_RADIUS_NM, SOMA, Obj, soma_object
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
    ctrl_seg: list[tuple[np.ndarray, list]]  # per object: (segment index per control point, chain offsets)

    def chain_segs(self, obj_index: int, chain_index: int) -> np.ndarray:
        """Segment index (-1 outside the volume) of each control point of one chain."""
        gseg, offs = self.ctrl_seg[obj_index]
        n = len(self.objects[obj_index].chains[chain_index].points)
        return gseg[offs[chain_index]:offs[chain_index] + n]


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


@dataclass(frozen=True)
class _ObjectRuns:
    """An object's control-point graph and how it falls apart into runs inside the volume (cached per object)."""

    pts: np.ndarray
    rad: np.ndarray
    comp: np.ndarray
    spine: np.ndarray
    ea: np.ndarray
    eb: np.ndarray
    offs: list
    inside: np.ndarray
    run: np.ndarray        # per element (control points, then edges): run rank, -1 none
    n_runs: int
    shell: np.ndarray      # control points inside another cell's soma shell


_RUNS_CACHE: dict = {}


SOMA_SHELL_NM = 300.0   # other objects keep their control points this far outside a soma (edges <= 250 nm long)


def foreign_somata(params: SynthParams, lo_nm: np.ndarray, hi_nm: np.ndarray) -> list[tuple[np.ndarray, float, int]]:
    """(centre, radius, key) of every soma whose ball (+ shell) meets the box: other objects must stay out of it."""
    if params.soma_probability <= 0:
        return []
    s = params.soma_cell_nm
    reach = MAX_SOMA_RADIUS_NM + SOMA_SHELL_NM
    lo_s = np.floor((np.asarray(lo_nm) - reach) / s).astype(int)
    hi_s = np.floor((np.asarray(hi_nm) + reach) / s).astype(int)
    out = []
    for c in itertools.product(*(range(a, b + 1) for a, b in zip(lo_s, hi_s))):
        o = soma_object(params.seed, s, params.soma_probability, *c)
        if o is None:
            continue
        near = np.clip(o.soma_center, lo_nm, hi_nm)
        if np.linalg.norm(near - o.soma_center) < o.soma_radius + SOMA_SHELL_NM:
            out.append((o.soma_center, float(o.soma_radius), o.key))
    return out


def _in_somata(pts: np.ndarray, somata, own_key: int, margin: float) -> np.ndarray:
    hit = np.zeros(len(pts), bool)
    for c, r, k in somata:
        if k != own_key:
            hit |= np.sum((pts - c) ** 2, axis=1) < (r + margin) ** 2
    return hit


def _object_runs(obj: Obj, vol_hi: np.ndarray, core_nm: float, params: SynthParams | None = None) -> _ObjectRuns:
    key = (obj.key, tuple(vol_hi), core_nm, id(obj),
           None if params is None else (params.soma_probability, params.soma_cell_nm))
    hit = _RUNS_CACHE.get(key)
    if hit is not None:
        return hit
    pts, rad, comp, spine, ea, eb, offs = _object_graph(obj)
    nc = len(pts)
    inside = np.all((pts >= 0) & (pts < vol_hi), axis=1)
    # neurites do not pass through other cells' somata: control points in a soma's shell count as outside, and
    # so do the edges touching them (see build_nodes), so the runs split there instead of tunnelling through
    shell = np.zeros(len(pts), bool)
    if params is not None:
        somata = foreign_somata(params, obj.lo, obj.hi)
        shell = _in_somata(pts, somata, obj.key, SOMA_SHELL_NM)
        inside &= ~shell
    if obj.soma_center is not None:  # control point 0 is the soma centre: inside when its ball meets the volume
        nearest = np.clip(obj.soma_center, 0, vol_hi)
        inside[0] = np.linalg.norm(nearest - obj.soma_center) < obj.soma_radius - core_nm
    both = inside[ea] & inside[eb]
    # edges with both ends outside that still cross the volume are pieces of their own
    cand = ~inside[ea] & ~inside[eb] & ~shell[ea] & ~shell[eb]
    crossing = np.zeros(len(ea), bool)
    if cand.any():
        crossing[cand] = _segment_hits_box(pts[ea[cand]], pts[eb[cand]], np.zeros(3), vol_hi)
    n_el = nc + len(ea)
    run = np.full(n_el, -1, np.int64)
    elements = np.concatenate([np.nonzero(inside)[0], nc + np.nonzero(crossing)[0]])
    n_runs = 0
    if len(elements):
        g = coo_matrix((np.ones(int(both.sum())), (ea[both], eb[both])), shape=(n_el, n_el))
        _, lab = connected_components(g, directed=False)
        uniq, inv = np.unique(lab[elements], return_inverse=True)
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(first, inv, elements)
        rank = np.argsort(np.argsort(first))
        run[elements] = rank[inv]
        n_runs = len(uniq)
    out = _ObjectRuns(pts, rad, comp, spine, ea, eb, offs, inside, run, n_runs, shell)
    if len(_RUNS_CACHE) > 50000:
        _RUNS_CACHE.clear()
    _RUNS_CACHE[key] = out
    return out


def build_nodes(params: SynthParams, objects: list[Obj], lo_nm: np.ndarray, hi_nm: np.ndarray,
                spacing_nm: float | None = None) -> Nodes:
    """Nodes every `spacing_nm` (default half the smallest voxel side, dense enough to rasterize) along every
    skeleton edge that comes within MAX_RADIUS_NM of [lo_nm, hi_nm)."""
    vs = np.array(params.voxel_size_zyx)
    ds = float(spacing_nm or vs.min() / 2.0)
    vol_hi = np.array(params.shape_zyx) * vs
    box_lo, box_hi = np.asarray(lo_nm) - MAX_RADIUS_NM, np.asarray(hi_nm) + MAX_RADIUS_NM
    seg_ids: list[int] = []
    seg_type: list[str] = []
    ctrl_seg_all: list[list[np.ndarray]] = []
    E: dict[str, list] = {k: [] for k in ("a", "b", "ra", "rb", "comp", "spine", "obj", "seg_a", "seg_b", "seg_x",
                                          "in_a", "in_b", "soma", "drop", "key")}
    somata = []
    for oi, obj in enumerate(objects):
        r = _object_runs(obj, vol_hi, params.core_nm, params)
        base = len(seg_ids)
        for k in range(r.n_runs):
            seg_ids.append((obj.key << 10) | min(k, 1023))
            seg_type.append(obj.cell_type)
        gseg = np.where(r.run >= 0, r.run + base, -1)
        nc = len(r.pts)
        ctrl_seg_all.append((gseg, r.offs))
        soma = obj.soma_center is not None
        if soma and r.inside[0]:
            somata.append((oi, int(gseg[0])))
        near = np.nonzero(_segment_hits_box(r.pts[r.ea], r.pts[r.eb], box_lo, box_hi))[0]
        if not len(near):
            continue
        a, b = r.ea[near], r.eb[near]
        E["a"].append(r.pts[a])
        E["b"].append(r.pts[b])
        is_soma_edge = (a == 0) if soma else np.zeros(len(a), bool)
        E["ra"].append(np.where(is_soma_edge, r.rad[b], r.rad[a]))
        E["rb"].append(r.rad[b])
        E["comp"].append(r.comp[b])
        E["spine"].append(r.spine[b])
        E["obj"].append(np.full(len(a), oi, np.int32))
        E["seg_a"].append(gseg[a])
        E["seg_b"].append(gseg[b])
        E["seg_x"].append(gseg[nc + near])
        E["in_a"].append(r.inside[a])
        E["in_b"].append(r.inside[b])
        E["drop"].append((r.shell[a] | r.shell[b]) & ~(r.inside[a] | r.inside[b]))
        E["key"].append(np.full(len(a), obj.key, np.int64))
        E["soma"].append(is_soma_edge)
    parts = []
    for oi, sg in somata:
        obj = objects[oi]
        parts.append(dict(pos=obj.soma_center[None].astype(float), rad=np.array([obj.soma_radius]),
                          comp=np.array([SOMA], np.uint8), par=np.array([-1]), obj=np.array([oi], np.int32),
                          seg=np.array([sg], np.int32), ins=np.array([True]), som=np.array([True]),
                          sp=np.array([False]), sub=np.array([0], np.int32)))
    if E["a"]:
        e = {k: np.concatenate(v) for k, v in E.items()}
        n_e = len(e["a"])
        length = np.linalg.norm(e["b"] - e["a"], axis=1)
        m = np.maximum(1, np.ceil(length / ds).astype(np.int64))
        counts = m + 1
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        total = int(counts.sum())
        eid = np.repeat(np.arange(n_e), counts)
        k = np.arange(total) - starts[eid]
        t = k / m[eid]
        pos = e["a"][eid] + (e["b"] - e["a"])[eid] * t[:, None]
        rad = e["ra"][eid] + (e["rb"] - e["ra"])[eid] * t
        ins = np.all((pos >= 0) & (pos < vol_hi), axis=1) & ~e["drop"][eid]
        comp_n = e["comp"][eid]
        for c, rs, sk in foreign_somata(params, box_lo, box_hi):
            in_ball = np.sum((pos - c) ** 2, axis=1) < rs * rs
            own = e["key"][eid] == sk
            ins &= ~(in_ball & ~own)
            comp_n = np.where(in_ball & own, SOMA, comp_n).astype(np.uint8)  # a cell's own branch roots are soma
        run = np.where(e["in_a"], e["seg_a"], np.where(e["in_b"], e["seg_b"], e["seg_x"]))[eid]
        both = (e["in_a"] & e["in_b"])[eid]
        seg = np.where(both, e["seg_a"][eid], np.where(ins, run, -1))
        keep = ~(e["soma"][eid] & (k == 0))        # the soma centre itself is not an axis node
        offset = sum(len(p["pos"]) for p in parts)
        par = offset + np.arange(total) - 1
        par[starts] = -1
        parts.append(dict(pos=pos, rad=rad, comp=comp_n, par=par, obj=e["obj"][eid],
                          seg=seg.astype(np.int32), ins=ins & (seg >= 0) & keep, som=np.zeros(total, bool),
                          sp=e["spine"][eid], sub=k.astype(np.int32)))
    if not parts:
        z = np.zeros(0)
        return Nodes(np.zeros((0, 3)), z.astype(np.float32), z.astype(np.uint8), z.astype(np.int64),
                     z.astype(np.int32), z.astype(np.int32), z.astype(bool), z.astype(bool), z.astype(bool),
                     z.astype(np.int32), np.array(seg_ids, dtype=np.uint64), seg_type, objects, ctrl_seg_all)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Nodes(cat["pos"], cat["rad"].astype(np.float32), cat["comp"].astype(np.uint8), cat["par"].astype(np.int64),
                 cat["obj"].astype(np.int32), cat["seg"], cat["ins"], cat["som"], cat["sp"].astype(bool), cat["sub"],
                 np.array(seg_ids, dtype=np.uint64), seg_type, objects, ctrl_seg_all)


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
        # the detour must step sideways: not along the directions in which the loser's chain continues
        nb = v + _STEPS
        ok_nb = np.all((nb >= 0) & (nb < shape), axis=1)
        cur_nb = np.full(len(_STEPS), -1)
        cur_nb[ok_nb] = out[tuple(nb[ok_nb].T)]
        along = {tuple(d) for d, c in zip(_STEPS, cur_nb) if c >= 0 and node_obj[c] == mine}
        sideways = [e for e in _STEPS if tuple(e) not in along and tuple(-e) not in along] or list(_STEPS)
        for e in sideways:
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
    oc = nodes.comp[owner]
    cap = params.core_nm + np.where(oc == AXON, params.axon_gap_nm,
                                    params.gap_nm + np.where(oc == GLIA, params.glia_fill_nm, 0.0))
    ok = (d2 < cap) & _inside_volume_mask(params, start, shape)
    seg = np.where(ok, nodes.seg[owner], -1).astype(np.int32)
    owner = np.where(ok, owner, -1)
    return seg, owner


def _inside_volume_mask(params: SynthParams, start, shape) -> np.ndarray:
    hi = np.array(params.shape_zyx)
    axes = [((np.arange(s, s + n) >= 0) & (np.arange(s, s + n) < h)) for s, n, h in zip(start, shape, hi)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
