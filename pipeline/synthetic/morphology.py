"""Neurites, glia and somata as trees of densely sampled nodes (positions in nm, ZYX), seeded per super-cell.

Each super-cell (a cube of `cell_nm`) seeds its objects with a generator keyed by (seed, super-cell index), so an
object is the same whichever block asks for it. A block gathers every super-cell whose objects can reach it
(`MAX_REACH_NM`), first as cheap coarse control points, and densifies only the objects that touch the block.

Morphology (not brightness) tells the types apart:
- axon: thin (35-70 nm), long, gently curving, with varicosities (boutons, 130-260 nm) every 0.8-2 um, rarely branched;
- smooth_dendrite: 200-350 nm tapering, branched, no spines, many mitochondria;
- spiny_dendrite: 250-420 nm tapering, spines every ~0.6 um (thin neck 28-45 nm, head 110-230 nm);
- glia: bushy, wiggly, many short side processes; fills the gaps between neurites (sheet-like processes);
- soma (neurons with a cell body): a ball of 2-3.5 um with 3-6 primary dendrites, in a coarser grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from pipeline.synthetic.noise import hash_key, rng_for
from pipeline.synthetic.params import COMPARTMENTS, SynthParams

KIND_CELL, KIND_SOMA_CELL = 11, 12
AXON, DEND = COMPARTMENTS["axon"], COMPARTMENTS["dendrite"]
SOMA, GLIA = COMPARTMENTS["soma"], COMPARTMENTS["glia"]

MAX_RADIUS_NM = 450.0          # largest node radius (thick dendrite, big bouton)
MAX_REACH_NM = 6500.0          # no node is farther than this from its super-cell's box (somata: see soma reach)
SOMA_REACH_NM = 3500.0 + 6000.0 + 2500.0 + 1500.0
MAX_SOMA_RADIUS_NM = 3500.0


@dataclass
class Chain:
    """An unbranched run of control points; `parent` is (chain index, control index) it hangs from, or None."""

    points: np.ndarray          # (n, 3) nm
    radius: np.ndarray          # (n,) nm
    compartment: int
    parent: tuple[int, int] | None = None
    bouton: np.ndarray | None = None   # (n,) bool, control points that are bouton centres
    spine_head: bool = False


@dataclass
class Obj:
    """One object (a neuron fragment, a glial cell): its chains, mitochondria, vesicle clouds and soma."""

    key: int                    # 52-bit, globally unique; segment ids are key << 10 | run
    cell_type: str
    chains: list[Chain]
    soma_center: np.ndarray | None = None
    soma_radius: float = 0.0
    mitos: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)  # (p0, p1, radius)
    lo: np.ndarray | None = None  # coarse bounds (nm) of control points
    hi: np.ndarray | None = None


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _random_dir(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.normal(size=3))


def _perp(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(d) * d
    return _unit(v)


def _walk(rng, start, direction, length, step, wiggle) -> np.ndarray:
    """Persistent random walk: control points every ~`step` nm, the direction drifting by `wiggle` per step."""
    n = max(2, int(length / step) + 1)
    d0 = _unit(np.asarray(direction, float))
    dirs = d0 + np.cumsum(rng.normal(size=(n - 1, 3)) * wiggle, axis=0)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pts = np.empty((n, 3))
    pts[0] = start
    pts[1:] = start + np.cumsum(dirs * step, axis=0)
    return pts


def _two_way_path(rng, anchor, length_each, step, wiggle) -> np.ndarray:
    d = _random_dir(rng)
    a = _walk(rng, anchor, d, length_each[0], step, wiggle)
    b = _walk(rng, anchor, -d, length_each[1], step, wiggle)
    return np.concatenate([a[::-1], b[1:]])


def _beaded_radius(rng, n, step, base, bead_r, spacing) -> tuple[np.ndarray, np.ndarray]:
    s = np.arange(n) * step
    gaps = rng.uniform(*spacing, size=int(s[-1] / spacing[0]) + 2)
    centres = rng.uniform(0, spacing[0]) + np.concatenate([[0.0], np.cumsum(gaps)])
    centres = centres[centres < s[-1]]
    rb = rng.uniform(*bead_r, size=len(centres))
    width = 0.6 * rb * rng.uniform(0.8, 1.3, size=len(centres))
    k = np.clip(np.rint(centres / step).astype(int), 0, n - 1)
    r = np.full(n, base)
    if len(k):
        bump = base + (rb - base)[:, None] * np.exp(-0.5 * ((s[None, :] - s[k][:, None]) / width[:, None]) ** 2)
        r = np.maximum(r, bump.max(0))
    bouton = np.zeros(n, bool)
    bouton[k] = True
    return r, bouton


def _mitos_along(rng, pts, radius, per_um, step) -> list:
    """Mitochondria as capsules inside the tube, roughly along it."""
    length_um = (len(pts) - 1) * step / 1000.0
    out = []
    for _ in range(rng.poisson(per_um * length_um)):
        k0 = int(rng.integers(0, len(pts) - 1))
        n = int(rng.integers(2, 7))
        k1 = min(len(pts) - 1, k0 + n)
        rmin = float(radius[k0:k1 + 1].min())
        mr = rng.uniform(35.0, 70.0)
        if rmin < mr + 25.0:
            continue
        d = pts[k1] - pts[k0]
        off = _perp(rng, _unit(d)) * rng.uniform(0, rmin - mr - 20.0)
        out.append((pts[k0] + off, pts[k1] + off, float(mr)))
    return out


def _axon(rng, anchor) -> Obj:
    step = 200.0
    pts = _two_way_path(rng, anchor, rng.uniform(1500, 3000, 2), step, 0.12)
    base = rng.uniform(35.0, 70.0)
    r, bouton = _beaded_radius(rng, len(pts), step, base, (130.0, 260.0), (800.0, 2000.0))
    chains = [Chain(pts, r, AXON, bouton=bouton)]
    if rng.random() < 0.3:
        k = int(rng.integers(1, len(pts) - 1))
        d = _unit(_unit(pts[k + 1] - pts[k]) + _perp(rng, _unit(pts[k + 1] - pts[k])) * 1.2)
        bp = _walk(rng, pts[k], d, rng.uniform(700, 1500), step, 0.15)
        br, bb = _beaded_radius(rng, len(bp), step, base * 0.9, (120.0, 220.0), (800.0, 2000.0))
        br[0] = r[k]
        bb[0] = False
        chains.append(Chain(bp, br, AXON, parent=(0, k), bouton=bb))
    return Obj(0, "axon", chains, mitos=_mitos_along(rng, pts, r, 0.1, step))


def _spines(rng, chain_index, pts, r, density_per_um, step) -> list[Chain]:
    out = []
    length_um = (len(pts) - 1) * step / 1000.0
    for _ in range(rng.poisson(density_per_um * length_um)):
        k = int(rng.integers(0, len(pts) - 1))
        t = _unit(pts[k + 1] - pts[k])
        d = _unit(_perp(rng, t) + rng.normal(size=3) * 0.2)
        neck_r = rng.uniform(28.0, 45.0)
        head_r = rng.uniform(110.0, 230.0)
        neck_len = rng.uniform(250.0, 800.0)
        s_step = 40.0
        start = pts[k] + d * 0.55 * r[k]
        n_neck = max(2, int(neck_len / s_step))
        s = np.arange(n_neck + int(2 * head_r / s_step) + 1) * s_step
        sp = start + d[None, :] * s[:, None]
        rad = np.full(len(s), neck_r)
        flare = s < 0.45 * r[k] + 80.0
        rad[flare] = np.maximum(neck_r, 0.55 * r[k] * (1 - s[flare] / (0.45 * r[k] + 80.0)) + neck_r)
        hc = neck_len + head_r
        inhead = np.abs(s - hc) < head_r
        rad[inhead] = np.maximum(rad[inhead], np.sqrt(head_r ** 2 - (s[inhead] - hc) ** 2))
        rad[-1] = max(rad[-1], 20.0)
        out.append(Chain(sp, rad, DEND, parent=(chain_index, k), spine_head=True))
    return out


def _dendrite(rng, anchor, spiny: bool, start_dir=None, length=None, r0=None, branches=True) -> list[Chain]:
    step = 250.0
    r0 = r0 if r0 is not None else (rng.uniform(250, 420) if spiny else rng.uniform(200, 350))
    if start_dir is None:
        pts = _two_way_path(rng, anchor, rng.uniform(1800, 3000, 2), step, 0.08)
    else:
        pts = _walk(rng, anchor, start_dir, length, step, 0.08)
    taper = np.linspace(1.0, rng.uniform(0.6, 0.85), len(pts))
    wobble = 1.0 + 0.08 * np.sin(np.arange(len(pts)) * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3))
    r = r0 * taper * wobble
    chains = [Chain(pts, r, DEND)]
    if branches:
        for _ in range(rng.poisson(0.8)):
            k = int(rng.integers(1, len(pts) - 1))
            t = _unit(pts[k + 1] - pts[k])
            d = _unit(t + _perp(rng, t) * rng.uniform(0.7, 1.5))
            bp = _walk(rng, pts[k], d, rng.uniform(800, 1800), step, 0.1)
            br = r[k] * np.linspace(0.75, 0.5, len(bp))
            br[0] = r[k]
            chains.append(Chain(bp, br, DEND, parent=(0, k)))
    if spiny:
        for ci in range(len(chains)):
            chains.extend(_spines(rng, ci, chains[ci].points, chains[ci].radius, 1.6, step))
    return chains


def _glia(rng, anchor) -> Obj:
    chains: list[Chain] = []
    step = 120.0
    for _ in range(int(rng.integers(4, 8))):
        d = _random_dir(rng)
        pts = _walk(rng, anchor + d * 150.0, d, rng.uniform(1200, 2600), step, 0.45)
        pts = np.concatenate([anchor[None], pts])
        r = np.linspace(rng.uniform(150, 220), 60.0, len(pts))
        ci = len(chains)
        chains.append(Chain(pts, r, GLIA, parent=None if ci == 0 else (0, 0)))
        for _ in range(rng.poisson(len(pts) / 3.0)):
            k = int(rng.integers(1, len(pts)))
            sd = _random_dir(rng)
            sp = _walk(rng, pts[k], sd, rng.uniform(150, 600), 80.0, 0.5)
            chains.append(Chain(sp, np.full(len(sp), 50.0), GLIA, parent=(ci, k)))
    return Obj(0, "glia", chains)


def _object_bounds(obj: Obj) -> None:
    pts = [c.points for c in obj.chains]
    if obj.soma_center is not None:
        pts.append(obj.soma_center[None] - obj.soma_radius)
        pts.append(obj.soma_center[None] + obj.soma_radius)
    allp = np.concatenate(pts)
    obj.lo = allp.min(0) - MAX_RADIUS_NM
    obj.hi = allp.max(0) + MAX_RADIUS_NM


# how far (nm) a node can be from its object's anchor, per type (see the generators above)
TYPE_REACH_NM = {"axon": 3000.0 + 1500.0, "glia": 150.0 + 2600.0 + 600.0 + 120.0,
                 "spiny_dendrite": 3000.0 + 1800.0 + 1500.0, "smooth_dendrite": 3000.0 + 1800.0}
TYPES_IN_CELL = ("axon", "spiny_dendrite", "smooth_dendrite", "glia")


@lru_cache(maxsize=8192)
def cell_anchors(seed: int, cell_nm: float, counts: tuple[float, float, float, float], cz: int, cy: int, cx: int
                 ) -> tuple[tuple[str, np.ndarray], ...]:
    """(type, anchor) of every object seeded in super-cell (cz, cy, cx); cheap, so blocks can skip far objects."""
    rng = rng_for(seed, KIND_CELL, cz, cy, cx)
    origin = np.array([cz, cy, cx], float) * cell_nm
    out = []
    for kind, mean in zip(TYPES_IN_CELL, counts):
        # stratified, not Poisson: the count varies by at most one and anchors spread over sub-cells, so the
        # neuropil has no voids where chance put few objects
        n = int(mean) + int(rng.random() < mean - int(mean))
        k = max(1, int(np.ceil(n ** (1.0 / 3.0))))
        slots = rng.permutation(k ** 3)[:n] if n else np.zeros(0, int)
        sub = np.stack(np.unravel_index(slots, (k, k, k)), 1) if n else np.zeros((0, 3))
        for s in sub:
            out.append((kind, origin + (s + rng.uniform(0, 1, 3)) * (cell_nm / k)))
    return tuple(out)


@lru_cache(maxsize=65536)
def cell_object(seed: int, cell_nm: float, counts: tuple[float, float, float, float], cz: int, cy: int, cx: int,
                index: int) -> Obj:
    """Object `index` of super-cell (cz, cy, cx): a pure function of its arguments."""
    kind, anchor = cell_anchors(seed, cell_nm, counts, cz, cy, cx)[index]
    sub = rng_for(seed, KIND_CELL, cz, cy, cx, index)
    if kind == "axon":
        obj = _axon(sub, anchor)
    elif kind == "glia":
        obj = _glia(sub, anchor)
    else:
        chains = _dendrite(sub, anchor, kind == "spiny_dendrite")
        obj = Obj(0, kind, chains, mitos=_mitos_along(sub, chains[0].points, chains[0].radius, 0.9, 250.0))
    obj.key = (hash_key(seed, KIND_CELL, cz, cy, cx, index) >> 12) | 1
    _object_bounds(obj)
    return obj


@lru_cache(maxsize=1024)
def soma_object(seed: int, soma_cell_nm: float, probability: float, cz: int, cy: int, cx: int) -> Obj | None:
    """At most one neuron with a cell body per coarse soma cell."""
    rng = rng_for(seed, KIND_SOMA_CELL, cz, cy, cx)
    if rng.random() >= probability:
        return None
    margin = MAX_SOMA_RADIUS_NM
    centre = np.array([cz, cy, cx], float) * soma_cell_nm + rng.uniform(margin, soma_cell_nm - margin, 3)
    radius = rng.uniform(2000.0, MAX_SOMA_RADIUS_NM)
    spiny = rng.random() < 0.7
    chains: list[Chain] = [Chain(centre[None].copy(), np.array([radius]), SOMA)]
    mitos = []
    for _ in range(int(rng.integers(3, 7))):
        d = _random_dir(rng)
        start = centre + d * radius * 0.8
        sub = _dendrite(rng, start, spiny, start_dir=d, length=rng.uniform(3000, 6000),
                        r0=rng.uniform(350, 450), branches=True)
        off = len(chains)
        for i, c in enumerate(sub):
            if c.parent is None:
                c.parent = (0, 0)
            else:
                c.parent = (c.parent[0] + off, c.parent[1])
        mitos += _mitos_along(rng, sub[0].points, sub[0].radius, 0.9, 250.0)
        chains.extend(sub)
    obj = Obj((hash_key(seed, KIND_SOMA_CELL, cz, cy, cx) >> 12) | 1,
              "spiny_dendrite" if spiny else "smooth_dendrite", chains, centre, radius, mitos)
    _object_bounds(obj)
    return obj


def objects_near(params: SynthParams, lo_nm: np.ndarray, hi_nm: np.ndarray) -> list[Obj]:
    """Every object whose nodes (grown by the largest radius) can touch the box [lo_nm, hi_nm), sorted by key."""
    c = params.cell_nm
    counts = (params.axons_per_cell, params.spiny_per_cell, params.smooth_per_cell, params.glia_per_cell)
    lo_c = np.floor((lo_nm - MAX_REACH_NM) / c).astype(int)
    hi_c = np.floor((hi_nm + MAX_REACH_NM) / c).astype(int)
    out = []
    for cz, cy, cx in itertools.product(*(range(a, b + 1) for a, b in zip(lo_c, hi_c))):
        for index, (kind, anchor) in enumerate(cell_anchors(params.seed, c, counts, cz, cy, cx)):
            reach = TYPE_REACH_NM[kind] + MAX_RADIUS_NM
            if np.any(anchor < lo_nm - reach) or np.any(anchor > hi_nm + reach):
                continue
            obj = cell_object(params.seed, c, counts, cz, cy, cx, index)
            if np.all(obj.hi > lo_nm) and np.all(obj.lo < hi_nm):
                out.append(obj)
    if params.soma_probability > 0:
        s = params.soma_cell_nm
        lo_s = np.floor((lo_nm - SOMA_REACH_NM) / s).astype(int)
        hi_s = np.floor((hi_nm + SOMA_REACH_NM) / s).astype(int)
        for cz, cy, cx in itertools.product(*(range(a, b + 1) for a, b in zip(lo_s, hi_s))):
            obj = soma_object(params.seed, s, params.soma_probability, cz, cy, cx)
            if obj is not None and np.all(obj.hi > lo_nm) and np.all(obj.lo < hi_nm):
                out.append(obj)
    out.sort(key=lambda o: o.key)
    return out
