"""Segment meshes with zmesh, written in Neuroglancer's legacy precomputed mesh format.

Legacy format: ``<dir>/info`` = ``{"@type": "neuroglancer_legacy_mesh"}``, a manifest ``<id>:0`` =
``{"fragments": [...]}`` per segment and one binary file per fragment (uint32 vertex count, float32 xyz in
nm, uint32 triangle indices). A fragment per (segment, block) lets blockwise meshing write each block's
pieces independently (`write_mesh_fragments`) and list them at the end (`write_mesh_manifests`); a
single-volume run uses `write_legacy_meshes`. The legacy format cannot be sharded, so it suits runs with up
to ~10^5 segments; larger runs use the multi-resolution Draco format (viz/multires_meshes.py).

Vertices are in nm in the volume's world frame: ``(voxel index + voxel_offset + 0.5) * voxel_size`` at a
voxel's centre, so the mesh surface sits between voxel centres exactly as Neuroglancer draws the voxels.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import zmesh

from storage.errors import ConnectomeError
from viz.kvstore import open_kvstore, write_json

LEGACY_INFO = {"@type": "neuroglancer_legacy_mesh"}


@dataclass(frozen=True)
class MeshOptions:
    """zmesh simplification: `reduction_factor` = target triangle-count divisor (0 = off);
    `max_error_nm` = how far a simplified vertex may move (None: one voxel, zmesh's default)."""

    reduction_factor: int = 10
    max_error_nm: float | None = None
    min_voxels: int = 0  # skip tiny pieces (segments with fewer voxels in this block)
    close: bool = False  # close surfaces cut by the array's border (right at dataset edges, wrong at block faces)


def mesh_labels(
    labels_zyx: np.ndarray,
    voxel_size_xyz_nm: Sequence[float],
    voxel_offset_xyz: Sequence[int] = (0, 0, 0),
    *,
    ids: Iterable[int] | None = None,
    options: MeshOptions = MeshOptions(),
) -> dict[int, zmesh.Mesh]:
    """Mesh every non-zero label (or only `ids`) of a ZYX array; vertices in world nm."""
    if labels_zyx.ndim != 3:
        raise ConnectomeError(f"expected a 3-d ZYX label array, got shape {labels_zyx.shape}")
    labels = labels_zyx
    if options.min_voxels > 0:
        values, counts = np.unique(labels, return_counts=True)
        small = values[(counts < options.min_voxels) & (values != 0)]
        if small.size:
            labels = np.where(np.isin(labels, small), 0, labels)
    mesher = zmesh.Mesher(tuple(float(v) for v in voxel_size_xyz_nm))
    # zmesh works in XYZ; .T of a C-order ZYX array is F-order XYZ
    mesher.mesh(np.asfortranarray(labels.T), close=bool(options.close))
    wanted = set(int(i) for i in ids) if ids is not None else None
    shift = np.asarray(voxel_offset_xyz, dtype=np.float64) * np.asarray(voxel_size_xyz_nm, dtype=np.float64)
    meshes: dict[int, zmesh.Mesh] = {}
    for label in mesher.ids():
        label = int(label)
        if label == 0 or (wanted is not None and label not in wanted):
            continue
        mesh = mesher.get(
            label,
            normals=False,
            reduction_factor=int(options.reduction_factor),
            max_error=options.max_error_nm,
            voxel_centered=True,
        )
        mesh.vertices = (mesh.vertices + shift).astype(np.float32)
        meshes[label] = mesh
    mesher.clear()
    return meshes


def encode_legacy_fragment(mesh: zmesh.Mesh) -> bytes:
    return mesh.to_precomputed()


def write_mesh_fragments(dest: str | os.PathLike, meshes: Mapping[int, zmesh.Mesh], fragment_name: str) -> dict[int, str]:
    """Write one fragment per segment named ``<id>:0:<fragment_name>``; returns {id: fragment key}."""
    kv = open_kvstore(dest)
    written: dict[int, str] = {}
    futures = []
    for segment_id, mesh in meshes.items():
        if len(mesh.faces) == 0:
            continue
        key = f"{int(segment_id)}:0:{fragment_name}"
        futures.append(kv.write(key, encode_legacy_fragment(mesh)))
        written[int(segment_id)] = key
    for f in futures:
        f.result()
    return written


def write_mesh_manifests(dest: str | os.PathLike, fragments: Iterable[tuple[int, str]]) -> int:
    """Write ``<id>:0`` manifests listing each segment's fragments, and the legacy ``info``."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for segment_id, key in fragments:
        by_id[int(segment_id)].append(key)
    kv = open_kvstore(dest)
    futures = [
        kv.write(f"{segment_id}:0", json.dumps({"fragments": sorted(keys)}).encode())
        for segment_id, keys in by_id.items()
    ]
    for f in futures:
        f.result()
    write_json(dest, "info", LEGACY_INFO)
    return len(by_id)


def write_legacy_meshes(dest: str | os.PathLike, meshes: Mapping[int, zmesh.Mesh]) -> int:
    """Single-piece meshes (one fragment each) plus manifests and info; returns the number of segments."""
    written = write_mesh_fragments(dest, meshes, "mesh")
    return write_mesh_manifests(dest, written.items())
