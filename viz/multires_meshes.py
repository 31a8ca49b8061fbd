"""Multi-resolution meshes (``neuroglancer_multilod_draco``), unsharded or sharded, for large runs.

Per segment: LOD 0 is the zmesh surface, LOD k the same surface simplified by ``lod_reduction**k`` (zmesh's
quadric edge collapse, error bound growing with the LOD). Each LOD is cut into an octree of nodes of
``chunk_shape * 2**k`` nm. Triangles crossing a node boundary are split at the boundary plane, and for
k > 0 also at the planes of the node's 2x2x2 children, because Neuroglancer draws a parent node in eight
parts when some children are loaded (meshes.md). Each node's triangles are Draco-encoded with integer
positions quantized to ``vertex_quantization_bits`` inside the node (Draco's own quantization set to the
identity, since Neuroglancer skips dequantization). The manifest lists nodes in Z-order per LOD; a node
whose children exist but that has no triangles of its own gets an empty fragment so the viewer can still
descend to its children.

Sharded layout (cloud-volume's `synthesize_shard_files`): the fragment data of a segment immediately
precedes its manifest in the shard, and the minishard index points at the manifest (raw data encoding:
Draco is already compressed and the offsets must address the stored bytes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import DracoPy
import numpy as np
import zmesh

from storage.errors import ConnectomeError
from viz.kvstore import hashed_sharding, open_kvstore, write_json


@dataclass(frozen=True)
class MultiresOptions:
    num_lods: int = 3  # at most; small segments get fewer
    chunk_voxels: int = 64  # LOD-0 node edge, in (finest) voxels
    vertex_quantization_bits: int = 16
    lod_reduction: int = 4  # triangle-count divisor per LOD step


# ------------------------------------------------------------------------------------------- geometry
def split_by_plane(verts: np.ndarray, faces: np.ndarray, axis: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    """Split every triangle that crosses the plane ``x[axis] == value`` into triangles on either side.

    Orientation is kept. New vertices lie exactly on the plane; vertices already on it count as both sides.
    """
    s = verts[:, axis] - value
    sign = np.sign(s).astype(np.int8)
    sign[np.abs(s) < 1e-9] = 0
    fs = sign[faces]
    crossing = (fs.max(axis=1) > 0) & (fs.min(axis=1) < 0)
    if not crossing.any():
        return verts, faces
    keep = faces[~crossing]
    cf, cs = faces[crossing], fs[crossing]
    new_verts = [verts]
    n0 = len(verts)
    out = [keep]

    def cut(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pa, pb = verts[a], verts[b]
        t = (value - pa[:, axis]) / (pb[:, axis] - pa[:, axis])
        p = pa + t[:, None] * (pb - pa)
        p[:, axis] = value
        return p

    # rotate each face (keeping orientation) so that vertex 0 is the special one:
    # the vertex on the plane (case A) or the one alone on its side (case B)
    has_zero = (cs == 0).any(axis=1)
    special = np.stack([_special(cs, k, has_zero) for k in range(3)], axis=1)  # exactly one per face
    lone = np.argmax(special, axis=1)
    idx = (lone[:, None] + np.arange(3)[None, :]) % 3
    rf = np.take_along_axis(cf, idx, axis=1)
    v0, v1, v2 = rf[:, 0], rf[:, 1], rf[:, 2]

    # case A: v0 on the plane, v1 and v2 on opposite sides -> (v0, v1, p12), (v0, p12, v2)
    a_mask = has_zero
    if a_mask.any():
        p = cut(v1[a_mask], v2[a_mask])
        ids = n0 + np.arange(len(p))
        n0 += len(p)
        new_verts.append(p)
        out.append(np.stack([v0[a_mask], v1[a_mask], ids], axis=1))
        out.append(np.stack([v0[a_mask], ids, v2[a_mask]], axis=1))
    # case B: v0 alone -> (v0, p01, p02), (p01, v1, v2), (p01, v2, p02)
    b_mask = ~has_zero
    if b_mask.any():
        p01 = cut(v0[b_mask], v1[b_mask])
        p02 = cut(v0[b_mask], v2[b_mask])
        i01 = n0 + np.arange(len(p01))
        i02 = i01 + len(p01)
        n0 += 2 * len(p01)
        new_verts += [p01, p02]
        out.append(np.stack([v0[b_mask], i01, i02], axis=1))
        out.append(np.stack([i01, v1[b_mask], v2[b_mask]], axis=1))
        out.append(np.stack([i01, v2[b_mask], i02], axis=1))
    return np.concatenate(new_verts), np.concatenate(out).astype(np.int64)


def _special(cs: np.ndarray, k: int, has_zero: np.ndarray) -> np.ndarray:
    """Vertex k is the one on the plane (faces touching it) or the one alone on its side."""
    a, b, c = cs[:, k], cs[:, (k + 1) % 3], cs[:, (k + 2) % 3]
    return np.where(has_zero, a == 0, (a != b) & (a != c))


def cut_to_grid(verts: np.ndarray, faces: np.ndarray, origin: np.ndarray, spacing: np.ndarray):
    """Split triangles at every grid plane ``origin + k * spacing`` crossing the mesh."""
    verts = verts.astype(np.float64)
    faces = faces.astype(np.int64)
    for axis in range(3):
        lo, hi = verts[:, axis].min(), verts[:, axis].max()
        k0 = math.floor((lo - origin[axis]) / spacing[axis]) + 1
        k1 = math.ceil((hi - origin[axis]) / spacing[axis]) - 1
        for k in range(k0, k1 + 1):
            verts, faces = split_by_plane(verts, faces, axis, origin[axis] + k * spacing[axis])
    return verts, faces


def morton_order(positions: np.ndarray) -> np.ndarray:
    """Argsort of integer xyz positions in Z-curve order (x least significant)."""
    positions = positions.astype(np.uint64)
    code = np.zeros(len(positions), np.uint64)
    for bit in range(21):
        for axis in range(3):
            code |= ((positions[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return np.argsort(code, kind="stable")


# ------------------------------------------------------------------------------------------- encoding
def lod_meshes(mesh: zmesh.Mesh, voxel_size_nm: Sequence[float], num_lods: int, reduction: int) -> list[tuple]:
    """[(vertices, faces)] for LOD 0..num_lods-1: the mesh, then simplified by reduction**k."""
    out = [(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64))]
    if num_lods > 1:
        mesher = zmesh.Mesher(tuple(float(v) for v in voxel_size_nm))
        finest = min(voxel_size_nm)
        for k in range(1, num_lods):
            simple = mesher.simplify(mesh, reduction_factor=int(reduction**k), max_error=finest * 2**k)
            if len(simple.faces) == 0:
                simple = mesh
            out.append((np.asarray(simple.vertices, np.float64), np.asarray(simple.faces, np.int64)))
    return out


def encode_segment(
    mesh: zmesh.Mesh, voxel_size_nm: Sequence[float], options: MultiresOptions = MultiresOptions()
) -> tuple[bytes, bytes]:
    """(fragment data, manifest) of one segment."""
    from cloudvolume.datasource.precomputed.mesh.multilod import MultiLevelPrecomputedMeshManifest

    bits = int(options.vertex_quantization_bits)
    qmax = float(2**bits - 1)
    verts = np.asarray(mesh.vertices, np.float64)
    chunk = np.full(3, float(options.chunk_voxels) * min(voxel_size_nm))
    origin = np.floor(verts.min(axis=0) / chunk) * chunk
    extent_nodes = np.ceil((verts.max(axis=0) - origin) / chunk).clip(min=1)
    num_lods = int(min(options.num_lods, max(1, math.ceil(math.log2(extent_nodes.max())) + 1)))
    lods = lod_meshes(mesh, voxel_size_nm, num_lods, options.lod_reduction)

    per_lod: list[dict[tuple[int, int, int], bytes]] = []
    for k, (v, f) in enumerate(lods):
        node = chunk * 2**k
        spacing = node / 2 if k > 0 else node
        v, f = cut_to_grid(v, f, origin, spacing)
        centroid = v[f].mean(axis=1)
        cells = np.floor((centroid - origin) / node).astype(np.int64)
        frags: dict[tuple[int, int, int], bytes] = {}
        order = np.lexsort(cells.T[::-1])
        cells, f = cells[order], f[order]
        starts = np.flatnonzero(np.r_[True, np.any(cells[1:] != cells[:-1], axis=1)])
        for a, b in zip(starts, np.r_[starts[1:], len(f)]):
            cell = tuple(int(c) for c in cells[a])
            sub = f[a:b]
            used, inverse = np.unique(sub, return_inverse=True)
            local = (v[used] - (origin + np.array(cell) * node)) / node * qmax
            q = np.clip(np.rint(local), 0, qmax)
            frags[cell] = DracoPy.encode(q.astype(np.float32), inverse.reshape(-1, 3).astype(np.uint32),
                                         quantization_bits=bits, quantization_range=qmax,
                                         quantization_origin=np.zeros(3, np.float32), compression_level=7)
        per_lod.append(frags)

    # every node needs its parent (the viewer walks the octree down from the coarsest LOD)
    for k in range(1, num_lods):
        for cell in list(per_lod[k - 1]):
            per_lod[k].setdefault(tuple(c >> 1 for c in cell), b"")
    positions, sizes, data = [], [], []
    for frags in per_lod:
        cells = np.array(list(frags), dtype=np.int64).reshape(-1, 3)
        order = morton_order(cells)
        positions.append(cells[order].astype(np.uint32))
        blobs = [frags[tuple(int(c) for c in cells[i])] for i in order]
        sizes.append(np.array([len(b) for b in blobs], np.uint32))
        data += blobs
    manifest = MultiLevelPrecomputedMeshManifest(
        segment_id=0, chunk_shape=chunk.astype(np.float32), grid_origin=origin.astype(np.float32),
        num_lods=num_lods, lod_scales=np.array([min(voxel_size_nm) * 2**k for k in range(num_lods)], np.float32),
        vertex_offsets=np.zeros((num_lods, 3), np.float32),
        num_fragments_per_lod=np.array([len(p) for p in positions], np.uint32),
        fragment_positions=positions, fragment_offsets=np.concatenate(sizes),
    )
    return b"".join(data), manifest.to_binary()


def multires_info(options: MultiresOptions, sharding: dict | None) -> dict:
    info = {
        "@type": "neuroglancer_multilod_draco",
        "vertex_quantization_bits": int(options.vertex_quantization_bits),
        "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        "lod_scale_multiplier": 1.0,
    }
    if sharding is not None:
        info["sharding"] = sharding
    return info


def write_multires_meshes(
    dest: str | os.PathLike,
    meshes: Mapping[int, zmesh.Mesh],
    voxel_size_xyz_nm: Sequence[float],
    *,
    options: MultiresOptions = MultiresOptions(),
    sharded: bool | None = None,
) -> int:
    """Encode and write every segment's multi-resolution mesh plus ``info``; returns the number written.

    Unsharded: ``<id>`` (fragment data, read by range) and ``<id>.index`` (manifest). Sharded (default above
    1,000 segments): whole shard files, built in memory per run of this function (one writer per shard).
    """
    if options.vertex_quantization_bits not in (10, 16):
        raise ConnectomeError(f"vertex_quantization_bits must be 10 or 16, got {options.vertex_quantization_bits}")
    encoded = {int(i): encode_segment(m, voxel_size_xyz_nm, options) for i, m in meshes.items() if len(m.faces)}
    if sharded is None:
        sharded = len(encoded) > 1000
    if not sharded:
        kv = open_kvstore(dest)
        futures = []
        for seg, (data, manifest) in encoded.items():
            futures += [kv.write(str(seg), data), kv.write(f"{seg}.index", manifest)]
        for f in futures:
            f.result()
        write_json(dest, "info", multires_info(options, None))
        return len(encoded)
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_files

    sharding = hashed_sharding(len(encoded), data_encoding="raw")
    spec = ShardingSpecification.from_dict(sharding)
    files = synthesize_shard_files(
        spec, {seg: data + manifest for seg, (data, manifest) in encoded.items()},
        data_offset={seg: len(manifest) for seg, (_, manifest) in encoded.items()},
    )
    kv = open_kvstore(dest)
    for f in [kv.write(name, blob) for name, blob in files.items()]:
        f.result()
    write_json(dest, "info", multires_info(options, sharding))
    return len(encoded)

