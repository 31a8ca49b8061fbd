"""mesh: zmesh per block (read box = write box + 1 voxel at the far faces), one legacy fragment per (segment, block).

Why blockwise: meshing a segmentation whole needs all of it in one process's memory, which caps a run at what one
machine holds (publish meshes in memory up to 512^3 voxels). Here each Dask block meshes only its read box; the
extra plane of voxels at the far faces makes the surfaces of face neighbours meet on the plane they share (the
igneous recipe), so a segment's fragments tile its surface. Every block writes its fragments ``<id>:0:b<block>``
straight into the mesh directory and the ids it wrote to ``<work_dir>/mesh_pieces/block_<id>.npy``; the driver then
writes one manifest per segment listing all its fragments, which Neuroglancer loads together. A block that is
rerun rewrites the same keys, so the ledger makes the stage resumable.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from segclr.skeletons import block_read_box
from storage.box import Block, BlockGrid, Box
from storage.volume import open_volume
from viz.meshes import MeshOptions, mesh_labels, write_mesh_fragments, write_mesh_manifests

PIECES = "mesh_pieces"


def fragment_name(block_id: int) -> str:
    return f"b{int(block_id)}"


def mesh_block(block: Block, *, seg_spec: dict, bounds: dict, mesh_url: str, work_dir: str, options: dict) -> dict:
    seg = open_volume(seg_spec)
    rb = block_read_box(block.write, Box.from_json(bounds))
    meshes = mesh_labels(seg.read(rb), seg.voxel_size, rb.xyz_start, options=MeshOptions(**options))
    written = write_mesh_fragments(mesh_url, meshes, fragment_name(block.block_id))
    out = Path(work_dir) / PIECES
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"block_{block.block_id}.tmp.npy"
    np.save(tmp, np.array(sorted(written), dtype=np.uint64))
    os.replace(tmp, out / f"block_{block.block_id}.npy")
    return {"segments": len(written), "triangles": int(sum(len(meshes[i].faces) for i in written))}


def block_fragments(work_dir: str | Path) -> list[tuple[int, str]]:
    """(segment id, fragment key) for every fragment the finished blocks wrote."""
    out = []
    for path in sorted((Path(work_dir) / PIECES).glob("block_*.npy")):
        if ".tmp" in path.name:
            continue
        name = fragment_name(int(path.stem.split("_", 1)[1]))
        out += [(int(i), f"{int(i)}:0:{name}") for i in np.load(path)]
    return out


def run_mesh(seg_url: str, mesh_url: str, work_dir: str | Path, *, client, block_shape_zyx=(256, 256, 256),
             options: MeshOptions = MeshOptions(), restart: bool = False, progress: bool = True) -> dict:
    """Mesh every segment of ``seg_url`` blockwise into ``mesh_url`` (legacy precomputed meshes, one fragment per
    segment and block, manifests and info); returns {"segments", "fragments", "triangles", "blocks"}."""
    from pipeline.runner import run_blockwise

    seg = open_volume(seg_url)
    work_dir = Path(work_dir)
    align = seg.chunk_shape
    block_shape = tuple(max(a, b // a * a) for b, a in zip(block_shape_zyx, align))
    grid = BlockGrid(seg.bounds, block_shape, alignment=align)
    if restart and (work_dir / PIECES).is_dir():
        for stale in (work_dir / PIECES).glob("block_*"):
            stale.unlink()
    results = run_blockwise("mesh", grid, mesh_block, client=client, ledger_dir=work_dir / "ledger",
                            params={"seg_spec": seg.spec, "bounds": seg.bounds.to_json(), "mesh_url": str(mesh_url),
                                    "work_dir": str(work_dir), "options": dataclasses.asdict(options)},
                            restart=restart, progress=progress)
    fragments = block_fragments(work_dir)
    segments = write_mesh_manifests(mesh_url, fragments)
    return {"segments": segments, "fragments": len(fragments), "blocks": grid.num_blocks,
            "triangles": int(sum(r["triangles"] for r in results.values()))}
