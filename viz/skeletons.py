"""Skeletons in Neuroglancer's ``neuroglancer_skeletons`` format, with radius and compartment per vertex.

Input is the store's ``skeleton_nodes`` table (segment_id, node_id, x_nm, y_nm, z_nm, radius_nm, parent_id,
compartment). One object per segment: uint32 vertex count, uint32 edge count, float32 [n, 3] positions in
nm (identity transform), uint32 [e, 2] edges (child, parent), then each vertex attribute in the order the
``info`` lists them: ``radius`` float32, ``compartment`` float32 (the code). The compartment is float32, not
uint8, because Neuroglancer's WebGL skeleton renderer rejects uint8 vertex attributes ("Data type not
supported by WebGL: UINT8") and then drops the whole skeleton source, which the browser test caught.

``skeletons/info`` is always written: without it Neuroglancer fails the whole segmentation layer.
Compartment codes follow SWC (0 unknown, 1 soma, 2 axon, 3 dendrite, 4 apical dendrite); other names get
the next codes in sorted order and are listed in the info's ``compartment_names``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import pandas as pd

from storage.errors import ConnectomeError
from viz.kvstore import hashed_sharding, write_json, write_uint64_index

SWC_CODES = {"unknown": 0, "soma": 1, "axon": 2, "dendrite": 3, "apical_dendrite": 4}
REQUIRED = ("segment_id", "node_id", "x_nm", "y_nm", "z_nm")


def compartment_codes(names: pd.Series | None) -> dict[str, int]:
    codes = dict(SWC_CODES)
    if names is not None:
        extra = sorted({str(n) for n in names.dropna().unique()} - set(codes))
        for name in extra:
            codes[name] = len(codes)
    if len(codes) > 255:
        raise ConnectomeError(f"too many compartment names ({len(codes)}); at most 256 are supported")
    return codes


def encode_skeleton(nodes: pd.DataFrame, codes: Mapping[str, int]) -> bytes:
    """Encode one segment's nodes (rows of skeleton_nodes) as a Neuroglancer skeleton object."""
    node_ids = nodes["node_id"].to_numpy(np.int64)
    order = {int(n): i for i, n in enumerate(node_ids)}
    vertices = nodes[["x_nm", "y_nm", "z_nm"]].to_numpy(np.float32)
    edges: list[tuple[int, int]] = []
    if "parent_id" in nodes:
        for child, parent in zip(node_ids, nodes["parent_id"].to_numpy()):
            if pd.notna(parent) and int(parent) in order:
                edges.append((order[int(child)], order[int(parent)]))
    edge_arr = np.asarray(edges, dtype=np.uint32).reshape(-1, 2)
    radius = (
        nodes["radius_nm"].fillna(0).to_numpy(np.float32)
        if "radius_nm" in nodes
        else np.zeros(len(nodes), np.float32)
    )
    if "compartment" in nodes:
        comp = nodes["compartment"].map(lambda c: codes.get(str(c), 0) if pd.notna(c) else 0).to_numpy(np.float32)
    else:
        comp = np.zeros(len(nodes), np.float32)
    header = np.asarray([len(vertices), len(edge_arr)], dtype="<u4").tobytes()
    return (
        header
        + vertices.astype("<f4").tobytes()
        + edge_arr.astype("<u4").tobytes()
        + radius.astype("<f4").tobytes()
        + comp.astype("<f4").tobytes()
    )


def skeleton_info(codes: Mapping[str, int], sharding: Mapping[str, Any] | None, segment_properties: str | None) -> dict:
    info: dict[str, Any] = {
        "@type": "neuroglancer_skeletons",
        "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        "vertex_attributes": [
            {"id": "radius", "data_type": "float32", "num_components": 1},
            {"id": "compartment", "data_type": "float32", "num_components": 1},
        ],
        "compartment_names": [name for name, _ in sorted(codes.items(), key=lambda kv: kv[1])],
    }
    if sharding is not None:
        info["sharding"] = dict(sharding)
    if segment_properties is not None:
        info["segment_properties"] = segment_properties
    return info


def write_skeletons(
    dest: str | os.PathLike,
    nodes: pd.DataFrame,
    *,
    sharded: bool | None = None,
    segment_properties: str | None = None,
) -> int:
    """Write every segment's skeleton under `dest` plus ``info``; returns the number of skeletons.

    `sharded=None` shards above 10,000 skeletons (one file per segment is fine below that).
    """
    missing = [c for c in REQUIRED if c not in nodes.columns]
    if missing:
        raise ConnectomeError(f"skeleton nodes table lacks columns {missing} (has {list(nodes.columns)})")
    codes = compartment_codes(nodes["compartment"] if "compartment" in nodes else None)
    groups = nodes.sort_values(["segment_id", "node_id"]).groupby("segment_id", sort=True)
    n = groups.ngroups
    if sharded is None:
        sharded = n > 10_000
    sharding = hashed_sharding(n) if sharded else None
    write_json(dest, "info", skeleton_info(codes, sharding, segment_properties))
    items = ((int(seg), encode_skeleton(group, codes)) for seg, group in groups)
    return write_uint64_index(dest, items, sharding)
