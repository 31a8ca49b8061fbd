"""A tiny deterministic 'run' for the viz tests: blobs with fragments, an EM-like image, skeletons, synapses.

Three cells (segment ids 11, 22, 33), each made of two fragments (supervoxels) split along x, so a split by
fragments has something to divide; the image has dark membranes at every cell boundary on a textured
background, which is what the viewer tests look for in screenshots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

SHAPE_ZYX = (64, 64, 64)
VOXEL_SIZE_XYZ = (8.0, 8.0, 8.0)
SEGMENTS = (11, 22, 33)
# fragment id -> segment id (pre-agglomeration supervoxels)
FRAGMENTS = {101: 11, 102: 11, 201: 22, 202: 22, 301: 33, 302: 33}
CENTERS_ZYX = {11: (32, 20, 18), 22: (32, 44, 30), 33: (32, 22, 46)}
RADII_ZYX = {11: (20, 12, 14), 22: (20, 13, 16), 33: (20, 12, 14)}


def make_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8, segmentation uint64, fragments uint64), all ZYX."""
    zz, yy, xx = np.indices(SHAPE_ZYX)
    seg = np.zeros(SHAPE_ZYX, np.uint64)
    frag = np.zeros(SHAPE_ZYX, np.uint64)
    for sid in SEGMENTS:
        (cz, cy, cx), (rz, ry, rx) = CENTERS_ZYX[sid], RADII_ZYX[sid]
        inside = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        inside &= seg == 0
        seg[inside] = sid
        first, second = [f for f, s in FRAGMENTS.items() if s == sid]
        frag[inside & (xx < cx)] = first
        frag[inside & (xx >= cx)] = second
    rng = np.random.default_rng(7)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE_ZYX), 1.5)
    image = 150 + 25 * texture / texture.std()
    boundary = ndimage.morphological_gradient(seg.astype(np.int64), size=3) > 0
    image[boundary] = 40
    image = ndimage.gaussian_filter(image, 0.7)
    return np.clip(image, 0, 255).astype(np.uint8), seg, frag


def skeleton_nodes() -> pd.DataFrame:
    """A 5-node chain along x through each cell (nm), soma in the middle, axon one side, dendrite the other."""
    rows = []
    node = 1
    for sid in SEGMENTS:
        (cz, cy, cx), (_, _, rx) = CENTERS_ZYX[sid], RADII_ZYX[sid]
        parent = None
        for k, dx in enumerate(np.linspace(-rx * 0.7, rx * 0.7, 5)):
            comp = "axon" if k < 2 else ("soma" if k == 2 else "dendrite")
            x, y, z = ((cx + dx + 0.5) * 8, (cy + 0.5) * 8, (cz + 0.5) * 8)
            rows.append(dict(segment_id=sid, node_id=node, x_nm=int(x), y_nm=int(y), z_nm=int(z),
                             radius_nm=float(20 + 5 * k), parent_id=parent, compartment=comp))
            parent = node
            node += 1
    df = pd.DataFrame(rows)
    df["parent_id"] = df["parent_id"].astype("Int64")
    return df


def synapses() -> pd.DataFrame:
    """Three synapses 11->22, 22->33, 33->11, each a line from inside the pre cell to inside the post cell."""

    def nm(zyx):
        z, y, x = zyx
        return int((x + 0.5) * 8), int((y + 0.5) * 8), int((z + 0.5) * 8)

    rows = []
    pairs = [(11, 22, 101, 201), (22, 33, 202, 302), (33, 11, 301, 102)]
    for i, (pre, post, pre_frag, post_frag) in enumerate(pairs, start=1):
        a, b = np.array(CENTERS_ZYX[pre], float), np.array(CENTERS_ZYX[post], float)
        pre_pt, post_pt = a + 0.55 * (b - a) - 0.12 * (b - a), a + 0.55 * (b - a) + 0.12 * (b - a)
        cleft = (pre_pt + post_pt) / 2
        px, py, pz = nm(pre_pt)
        qx, qy, qz = nm(post_pt)
        cx, cy, cz = nm(cleft)
        rows.append(dict(synapse_id=i, pre_segment_id=pre, post_segment_id=post, pre_fragment_id=pre_frag,
                         post_fragment_id=post_frag, x_nm=cx, y_nm=cy, z_nm=cz, pre_x_nm=px, pre_y_nm=py,
                         pre_z_nm=pz, post_x_nm=qx, post_y_nm=qy, post_z_nm=qz, score=0.5 + 0.1 * i,
                         size_voxels=10 * i))
    return pd.DataFrame(rows)


def segment_table(seg: np.ndarray) -> pd.DataFrame:
    ids, counts = np.unique(seg[seg > 0], return_counts=True)
    types = {11: "Mi1 neuron", 22: "T4", 33: "T4"}
    syn = synapses()
    return pd.DataFrame(
        dict(segment_id=ids.astype(np.int64), label=[f"cell {i}" for i in ids],
             cell_type=[types[int(i)] for i in ids], cell_type_confidence=[0.9, 0.8, 0.7],
             voxel_count=counts.astype(np.int64),
             synapses_in=[int((syn.post_segment_id == i).sum()) for i in ids],
             synapses_out=[int((syn.pre_segment_id == i).sum()) for i in ids])
    )


def make_store(path, seg: np.ndarray, frag: np.ndarray):
    """A connectome store for the sample: segments, fragment id map, cell types, skeletons, synapses (version 1+)."""
    from storage.store import ConnectomeStore

    store = ConnectomeStore.create(str(path))
    table = segment_table(seg)
    fids, fcounts = np.unique(frag[frag > 0], return_counts=True)
    with store.loading("viz sample") as v:
        store.write_segments(table[["segment_id", "voxel_count"]], version=v)
        store.write_id_map(pd.DataFrame({"fragment_id": fids.astype(np.int64),
                                         "segment_id": [FRAGMENTS[int(f)] for f in fids],
                                         "voxel_count": fcounts.astype(np.int64)}), version=v)
        store.write_cell_types(table[["segment_id", "cell_type"]].assign(confidence=table.cell_type_confidence),
                               version=v)
        nodes = skeleton_nodes()
        store.write_skeleton_nodes(nodes, version=v)
        syn = synapses().drop(columns=["pre_segment_id", "post_segment_id"])
        store.write_synapses(syn.assign(valid=True), version=v)
    return store
