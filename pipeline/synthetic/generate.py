"""`generate_box`: one box of synthetic EM + ground truth, a pure function of (params, box).

No global pass: a box looks only at the super-cells whose objects can reach it, computes labels on itself grown by
`label_pad_voxels + render_pad_voxels` and renders on itself grown by `render_pad_voxels`, then crops. So a volume
generated as one box and as any tiling of sub-boxes is byte-identical (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.synthetic.labels import build_nodes, compute_labels, label_pad_voxels
from pipeline.synthetic.morphology import MAX_RADIUS_NM, objects_near
from pipeline.synthetic.params import SynthParams
from pipeline.synthetic.render import PSD_MARGIN_NM, cleft_frame, cleft_slab, render, render_pad_voxels
from pipeline.synthetic.synapses import SYNAPSE_NODE_SPACING_NM, Synapse, boutons_in, find_synapses, vesicles
from storage.box import Box
from storage.errors import ConnectomeError

VOLUME_KEYS = ("raw", "gt", "compartments", "clefts")
BOUTON_MARGIN_NM = 500.0        # boutons whose cleft or vesicles can reach the render box
# nodes a synapse decision looks at: bouton margin + bouton/post radii + tolerance + the third-object check
SYNAPSE_CONTEXT_NM = BOUTON_MARGIN_NM + 2 * MAX_RADIUS_NM + 400.0
# a synapse is kept only where both partners line its cleft, each over at least this volume of the cleft slab
# (about 20 voxels at 8 x 8 x 40 nm)
MIN_CLEFT_SIDE_NM3 = 50_000.0
SYNAPSE_COLUMNS = ["synapse_id", "pre_segment_id", "post_segment_id", "x", "y", "z", "x_nm", "y_nm", "z_nm",
                   "pre_x_nm", "pre_y_nm", "pre_z_nm", "post_x_nm", "post_y_nm", "post_z_nm",
                   "pre_x", "pre_y", "pre_z", "post_x", "post_y", "post_z", "cleft_radius_nm", "post_kind"]


@dataclass
class SynthBlock:
    """Volumes of a box (ZYX arrays: raw uint8, gt uint64, compartments uint8, clefts uint64) and its table rows:
    synapses whose cleft centre lies in the box, and (segment_id, cell_type, voxels) of segments seen in the box."""

    volumes: dict[str, np.ndarray]
    synapses: pd.DataFrame
    segments: pd.DataFrame
    cleft_voxels: pd.DataFrame | None = None   # (synapse_id, voxels) of cleft voxels in the box


def _as_box(box) -> Box:
    if isinstance(box, Box):
        return box
    if isinstance(box, (tuple, list)) and len(box) == 2:
        return Box(tuple(box[0]), tuple(box[1]))
    raise ConnectomeError(f"expected a Box or (start_zyx, stop_zyx), got {box!r}")


def generate_block(params: SynthParams, box: Box | Sequence) -> SynthBlock:
    box = _as_box(box)
    bounds = Box((0, 0, 0), params.shape_zyx)
    if box.empty or not bounds.contains(box):
        raise ConnectomeError(f"box {box} is outside the synthetic volume {bounds}")
    vs = np.array(params.voxel_size_zyx)
    rbox = box.grow(render_pad_voxels(params))
    lbox = rbox.grow(label_pad_voxels(params))
    # nodes are needed over the label box and, for synapse decisions, 1.7 um around the render box
    node_lo = np.minimum(np.array(lbox.start) * vs, np.array(rbox.start) * vs - SYNAPSE_CONTEXT_NM)
    node_hi = np.maximum(np.array(lbox.stop) * vs, np.array(rbox.stop) * vs + SYNAPSE_CONTEXT_NM)
    objects = objects_near(params, node_lo, node_hi)
    nodes = build_nodes(params, objects, np.array(lbox.start) * vs, np.array(lbox.stop) * vs)
    syn_nodes = build_nodes(params, objects, node_lo, node_hi, spacing_nm=SYNAPSE_NODE_SPACING_NM)
    seg_idx, owner = compute_labels(nodes, params, rbox.start, rbox.shape)
    labels, lonely = _segment_ids(nodes, seg_idx)
    owner[lonely] = -1
    comp = np.zeros(labels.shape, np.uint8)
    if len(nodes.comp):
        comp = np.where(owner >= 0, nodes.comp[np.maximum(owner, 0)], 0).astype(np.uint8)

    r_lo = np.array(rbox.start) * vs
    r_hi = np.array(rbox.stop) * vs
    boutons = boutons_in(nodes, r_lo - BOUTON_MARGIN_NM, r_hi + BOUTON_MARGIN_NM)
    synapses = apposed(params, find_synapses(params, syn_nodes, boutons), labels, rbox, objects)
    ves_pos, ves_host = vesicles(params, nodes, boutons, synapses)
    mitos = []
    for oi, obj in enumerate(objects):
        if not obj.mitos:
            continue
        ctrl = np.concatenate([c.points for c in obj.chains])
        ctrl_seg = nodes.ctrl_seg[oi][0][:len(ctrl)]
        for p0, p1, mr in obj.mitos:
            c = (p0 + p1) / 2
            if np.any(c < r_lo - 1000.0) or np.any(c > r_hi + 1000.0):
                continue
            host = ctrl_seg[np.argmin(np.linalg.norm(ctrl - c, axis=1))]
            if host >= 0:
                mitos.append((p0, p1, mr, nodes.seg_ids[host]))
    nuclei = []
    for oi, obj in enumerate(objects):
        if obj.soma_center is not None and nodes.ctrl_seg[oi][0][0] >= 0:
            rng = np.random.default_rng(obj.key)
            offset = rng.normal(size=3) * 0.12 * obj.soma_radius
            nuclei.append((obj.soma_center + offset, 0.55 * obj.soma_radius, nodes.seg_ids[nodes.ctrl_seg[oi][0][0]]))
    raw, clefts = render(params, rbox.start, rbox.shape, labels, mitos, ves_pos, ves_host, synapses, nuclei)
    crop = box.relative_to(rbox).slices
    volumes = {"raw": raw[crop], "gt": labels[crop], "compartments": comp[crop], "clefts": clefts[crop]}
    ids, counts = np.unique(volumes["clefts"], return_counts=True)
    cleft_voxels = pd.DataFrame({"synapse_id": ids[ids != 0].astype(np.uint64), "voxels": counts[ids != 0]})
    return SynthBlock(volumes, _synapse_rows(params, synapses, box), _segment_rows(nodes, volumes["gt"]),
                      cleft_voxels)


def apposed(params: SynthParams, synapses: list[Synapse], labels: np.ndarray, rbox: Box, objects) -> list[Synapse]:
    """The synapses that reach the render box `rbox` and whose pre and post segments both line the cleft.

    Why: synapses are found from node spheres (nominal radius + gap), and the label volume (cores grown, glia
    filling interstices, nearest core wins) does not always realise that contact. Without this check 30 % of
    the synapses had no postsynaptic voxel at their cleft: no PSD was drawn, so no detector could see them, yet
    they were ground truth. The decision reads labels only, which are the same in every block: the block's own
    labels when the cleft lies inside them, else labels computed for the cleft's small box (`labels_of_box`)."""
    vs = np.array(params.voxel_size_zyx)
    inner = rbox.grow(-1)  # the outermost layer's isolated-voxel rule saw no neighbours beyond rbox
    keep = []
    for s in synapses:
        reach = max(1.6 * s.radius_nm + 60.0, s.radius_nm + PSD_MARGIN_NM)  # its vesicle cloud and PSD
        if rbox.intersect(_box_around(s.cleft_nm, reach, vs)).empty:
            continue
        box = _box_around(s.cleft_nm, s.radius_nm + params.cleft_half_thickness_nm + vs.max(), vs)
        lab = labels[box.relative_to(rbox).slices] if inner.contains(box) else labels_of_box(params, objects, box)
        sl, a, radial = cleft_frame(s, box.start, box.shape, vs, 0.0)
        lab = lab[sl]
        slab = cleft_slab(s, a, radial, lab, params)
        sides = [int(np.count_nonzero(slab & (lab == i))) for i in (s.pre_segment_id, s.post_segment_id)]
        if min(sides) * float(np.prod(vs)) >= MIN_CLEFT_SIDE_NM3:
            keep.append(s)
    return keep


def _box_around(centre_nm: np.ndarray, radius_nm: float, vs: np.ndarray) -> Box:
    lo = np.floor((np.asarray(centre_nm) - radius_nm) / vs).astype(np.int64)
    hi = np.ceil((np.asarray(centre_nm) + radius_nm) / vs).astype(np.int64) + 1
    return Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi))


def labels_of_box(params: SynthParams, objects, box: Box) -> np.ndarray:
    """Ground-truth ids of `box` computed on their own: the values every block has there (`objects` must include
    every object near the box)."""
    vs = np.array(params.voxel_size_zyx)
    grown = box.grow(1)
    lbox = grown.grow(label_pad_voxels(params))
    lo, hi = np.array(lbox.start) * vs, np.array(lbox.stop) * vs
    near = [o for o in objects if np.all(o.hi > lo) and np.all(o.lo < hi)]  # objects_near's test: same nodes, faster
    nodes = build_nodes(params, near, lo, hi)
    seg_idx, _ = compute_labels(nodes, params, grown.start, grown.shape)
    return _segment_ids(nodes, seg_idx)[0][1:-1, 1:-1, 1:-1]


def _segment_ids(nodes, seg_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, isolated-voxel mask) from compute_labels' segment indices; isolated voxels become 0."""
    labels = np.concatenate([np.zeros(1, np.uint64), nodes.seg_ids])[seg_idx.astype(np.int64) + 1]
    lonely = isolated_voxels(labels)
    labels[lonely] = 0
    return labels, lonely


def isolated_voxels(labels: np.ndarray) -> np.ndarray:
    """Labelled voxels none of whose 6 neighbours share their label (discrete Voronoi cells can touch a thin wedge
    only diagonally); they become extracellular space. A 1-voxel rule, so it is the same in every padded box."""
    same = np.zeros(labels.shape, bool)
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax] = slice(1, None)
        b[ax] = slice(None, -1)
        eq = labels[tuple(a)] == labels[tuple(b)]
        same[tuple(a)] |= eq
        same[tuple(b)] |= eq
    return ~same & (labels != 0)


def generate_box(params: SynthParams, box: Box | Sequence) -> dict[str, np.ndarray]:
    """raw (uint8), gt (uint64 segment ids), compartments (uint8), clefts (uint64 synapse ids) of `box` (ZYX)."""
    return generate_block(params, box).volumes


def _synapse_rows(params: SynthParams, synapses, box: Box) -> pd.DataFrame:
    vs = np.array(params.voxel_size_zyx)
    rows = []
    for s in synapses:
        v = np.floor(s.cleft_nm / vs).astype(np.int64)
        if not box.contains_point(v):
            continue
        pre_v = np.floor(s.pre_nm / vs).astype(np.int64)
        post_v = np.floor(s.post_nm / vs).astype(np.int64)
        rows.append((np.uint64(s.synapse_id), np.uint64(s.pre_segment_id), np.uint64(s.post_segment_id),
                     int(v[2]), int(v[1]), int(v[0]),
                     float(s.cleft_nm[2]), float(s.cleft_nm[1]), float(s.cleft_nm[0]),
                     float(s.pre_nm[2]), float(s.pre_nm[1]), float(s.pre_nm[0]),
                     float(s.post_nm[2]), float(s.post_nm[1]), float(s.post_nm[0]),
                     int(pre_v[2]), int(pre_v[1]), int(pre_v[0]), int(post_v[2]), int(post_v[1]), int(post_v[0]),
                     float(s.radius_nm), s.post_kind))
    df = pd.DataFrame(rows, columns=SYNAPSE_COLUMNS)
    for c in ("synapse_id", "pre_segment_id", "post_segment_id"):
        df[c] = df[c].astype(np.uint64)
    return df


def _segment_rows(nodes, gt: np.ndarray) -> pd.DataFrame:
    ids, counts = np.unique(gt, return_counts=True)
    keep = ids != 0
    ids, counts = ids[keep], counts[keep]
    type_of = dict(zip(nodes.seg_ids.tolist(), nodes.seg_type))
    return pd.DataFrame({"segment_id": ids.astype(np.uint64), "cell_type": [type_of[int(i)] for i in ids],
                         "voxels": counts.astype(np.int64)})


def merge_tables(blocks: Sequence) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine per-block rows (SynthBlock or (synapses, segments[, cleft_voxels]) tuples) into the volume's synapse
    table (with `cleft_voxels`, the synapse's size in voxels) and cell-type table (voxel counts summed)."""
    parts = [(b.synapses, b.segments, b.cleft_voxels) if isinstance(b, SynthBlock) else (tuple(b) + (None,))[:3]
             for b in blocks]
    syn = [p[0] for p in parts]
    seg = [p[1] for p in parts]
    cle = [p[2] for p in parts if p[2] is not None]
    synapses = pd.concat(syn, ignore_index=True) if syn else pd.DataFrame(columns=SYNAPSE_COLUMNS)
    synapses = synapses.sort_values("synapse_id", kind="stable").reset_index(drop=True)
    for c in ("synapse_id", "pre_segment_id", "post_segment_id"):
        synapses[c] = synapses[c].astype(np.uint64)
    if cle:
        sizes = pd.concat(cle, ignore_index=True).groupby("synapse_id")["voxels"].sum()
        synapses["cleft_voxels"] = [int(sizes.get(int(i), 0)) for i in synapses["synapse_id"]]
    segments = pd.concat(seg, ignore_index=True) if seg else pd.DataFrame(columns=["segment_id", "cell_type", "voxels"])
    segments = (segments.groupby(["segment_id", "cell_type"], as_index=False)["voxels"].sum()
                .sort_values("segment_id", kind="stable").reset_index(drop=True))
    segments["segment_id"] = segments["segment_id"].astype(np.uint64)
    return synapses, segments
