"""Synapses between touching segments, decided from node geometry alone (so every block agrees).

A synapse is a bouton (axon varicosity) touching a dendrite or spine head of another object: the surfaces (node
spheres) come within 2 * gap_nm, and no third object's surface is nearer to the contact point. Each candidate is kept
with a probability keyed by (seed, bouton, post object). The cleft is the disc through the contact point, normal to
the bouton -> post direction; the PSD is the post side of it, the vesicle cloud sits in the bouton behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from pipeline.synthetic.labels import Nodes
from pipeline.synthetic.morphology import DEND, MAX_RADIUS_NM
from pipeline.synthetic.noise import hash_key, rng_for
from pipeline.synthetic.params import SynthParams

KIND_SYN, KIND_SYN_ID, KIND_SYN_VES, KIND_BOUTON_VES = 77, 78, 79, 80


@dataclass
class Synapse:
    synapse_id: int
    pre_segment_id: int
    post_segment_id: int
    cleft_nm: np.ndarray        # (3,) ZYX
    normal: np.ndarray          # unit, pre -> post
    radius_nm: float
    pre_nm: np.ndarray
    post_nm: np.ndarray
    post_kind: str              # "spine" or "shaft"


@dataclass
class Boutons:
    pos: np.ndarray             # (B, 3) nm
    radius: np.ndarray          # (B,)
    obj: np.ndarray             # (B,) object index
    seg: np.ndarray             # (B,) segment index
    key: list[tuple[int, int, int]]  # (object key, chain, control index)


def boutons_in(nodes: Nodes, lo_nm: np.ndarray, hi_nm: np.ndarray) -> Boutons:
    pos, rad, obj_i, seg_i, keys = [], [], [], [], []
    for oi, obj in enumerate(nodes.objects):
        for ci, ch in enumerate(obj.chains):
            if ch.bouton is None or not ch.bouton.any():
                continue
            ks = np.nonzero(ch.bouton)[0]
            segs = nodes.chain_segs(oi, ci)[ks]
            p = ch.points[ks]
            ok = np.all((p > lo_nm) & (p < hi_nm), axis=1) & (segs >= 0)
            for k in ks[ok]:
                pos.append(ch.points[k])
                rad.append(float(ch.radius[k]))
                obj_i.append(oi)
                seg_i.append(int(segs[list(ks).index(k)]))
                keys.append((obj.key, ci, int(k)))
    if not pos:
        return Boutons(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), [])
    return Boutons(np.array(pos), np.array(rad), np.array(obj_i, np.int64), np.array(seg_i, np.int64), keys)


SYNAPSE_NODE_SPACING_NM = 20.0


def find_synapses(params: SynthParams, nodes: Nodes, boutons: Boutons) -> list[Synapse]:
    """`nodes` at SYNAPSE_NODE_SPACING_NM over the synapse context box (the same nodes in every block)."""
    if len(boutons.pos) == 0:
        return []
    tol = 2.0 * params.gap_nm
    usable = (nodes.seg >= 0) & ~nodes.is_soma
    post_idx = np.nonzero(usable & (nodes.comp == DEND))[0]
    all_idx = np.nonzero(usable)[0]
    if len(post_idx) == 0:
        return []
    post_tree = cKDTree(nodes.pos[post_idx])
    all_tree = cKDTree(nodes.pos[all_idx])
    out: list[Synapse] = []
    for b, rb, bo, bseg, key in zip(boutons.pos, boutons.radius, boutons.obj, boutons.seg, boutons.key):
        cand = post_idx[post_tree.query_ball_point(b, rb + MAX_RADIUS_NM + tol)]
        cand = cand[nodes.obj[cand] != bo]
        if len(cand) == 0:
            continue
        dist = np.linalg.norm(nodes.pos[cand] - b, axis=1)
        gap = dist - rb - nodes.radius[cand]
        cand, gap, dist = cand[gap < tol], gap[gap < tol], dist[gap < tol]
        if len(cand) == 0:
            continue
        order = np.lexsort((cand, gap))
        seen: set[int] = set()
        for j in order:
            q = int(cand[j])
            o = int(nodes.obj[q])
            if o in seen or len(seen) >= 2:
                continue
            seen.add(o)
            post_key = nodes.objects[o].key
            spine = bool(nodes.spine[q])
            p_keep = params.spine_synapse_probability if spine else params.synapse_probability
            if hash_key(params.seed, KIND_SYN, *key, post_key) / 2.0 ** 64 >= p_keep:
                continue
            u = (nodes.pos[q] - b) / max(dist[j], 1e-9)
            m = b + u * (rb + gap[j] / 2.0)
            # no third object may sit between them: the nearest surface to m must be pre's or post's
            near = all_idx[all_tree.query_ball_point(m, MAX_RADIUS_NM + tol)]
            if len(near):
                s = np.linalg.norm(nodes.pos[near] - m, axis=1) - nodes.radius[near]
                if int(nodes.obj[near[np.argmin(s)]]) not in (o, int(bo)):
                    continue
            rq = float(nodes.radius[q])
            radius = min(params.cleft_radius_nm, 0.75 * rb, 0.75 * rq)
            sid = (hash_key(params.seed, KIND_SYN_ID, *key, post_key) >> 2) | 1
            out.append(Synapse(sid, int(nodes.seg_ids[bseg]), int(nodes.seg_ids[nodes.seg[q]]), m, u,
                               radius, b.copy(), m + u * min(rq, 80.0), "spine" if spine else "shaft"))
    out.sort(key=lambda s: s.synapse_id)
    return out


def vesicles(params: SynthParams, nodes: Nodes, boutons: Boutons, synapses: list[Synapse]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Vesicle centres (nm) and their host segment ids: a cloud in every bouton, a dense one behind every cleft."""
    pos, host = [], []
    for b, rb, bseg, key in zip(boutons.pos, boutons.radius, boutons.seg, boutons.key):
        rng = rng_for(params.seed, KIND_BOUTON_VES, *key)
        n = int(params.vesicles_per_bouton * (rb / 150.0) ** 3)
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        r = 0.8 * rb * rng.random(n) ** (1 / 3)
        pos.append(b + d * r[:, None])
        host.append(np.full(n, nodes.seg_ids[bseg], np.uint64))
    for s in synapses:
        rng = rng_for(params.seed, KIND_SYN_VES, s.synapse_id)
        n = 50
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        d[(d @ s.normal) > 0] *= -1
        r = rng.uniform(25.0, 1.6 * s.radius_nm, n)
        pos.append(s.cleft_nm + d * r[:, None])
        host.append(np.full(n, s.pre_segment_id, np.uint64))
    if not pos:
        return np.zeros((0, 3)), np.zeros(0, np.uint64)
    return np.concatenate(pos), np.concatenate(host)
