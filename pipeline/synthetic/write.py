"""Write a synthetic volume blockwise on Dask: DST/raw, DST/gt, DST/compartments, DST/clefts (zarr3), and the tables
DST/synapses.parquet, DST/cell_types.parquet plus DST/synth.json (parameters and counts, written last).

Each block regenerates its own box from (params, box) alone, so blocks run anywhere, in any order, and a resumed
run (the runner's ledger) writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.synthetic.generate import SYNAPSE_COLUMNS, generate_block, merge_tables
from pipeline.synthetic.params import SynthParams
from storage.box import Block, BlockGrid, Box
from storage.errors import ConnectomeError

LAYERS = {  # name -> (dtype, kind)
    "raw": ("uint8", "image"),
    "gt": ("uint64", "segmentation"),
    "compartments": ("uint8", "segmentation"),
    "clefts": ("uint64", "segmentation"),
}


def default_chunk_shape(shape_zyx) -> tuple[int, int, int]:
    return tuple(int(min(s, c)) for s, c in zip(shape_zyx, (32, 128, 128)))  # type: ignore[return-value]


def default_block_shape(shape_zyx, chunk) -> tuple[int, int, int]:
    want = (64, 256, 256)
    return tuple(int(c * max(1, min(w, s) // c)) for s, c, w in zip(shape_zyx, chunk, want))  # type: ignore


def synth_block(block: Block, *, params: dict, specs: dict) -> dict[str, Any]:
    """Dask block function: generate the block's write box, write its four layers, return its table rows."""
    from storage.volume import open_volume

    p = SynthParams.from_json(params)
    out = generate_block(p, block.write)
    for name, spec in specs.items():
        open_volume(spec, mode="r+").write(block.write, out.volumes[name])
    syn = out.synapses.astype({c: object for c in ("synapse_id", "pre_segment_id", "post_segment_id")})
    return {"synapses": [[v.item() if hasattr(v, "item") else v for v in row] for row in syn.itertuples(index=False)],
            "segments": [[int(r.segment_id), r.cell_type, int(r.voxels)] for r in out.segments.itertuples(index=False)],
            "clefts": [[int(r.synapse_id), int(r.voxels)] for r in out.cleft_voxels.itertuples(index=False)]}


# bytes written per voxel, all layers, as compressed on disk (measured: 1.53 at 64 x 256 x 256; the EM's noise does
# not compress, the labels do)
BYTES_PER_VOXEL = 1.6


def check_disk_space(dst: Path, shape_zyx) -> None:
    """Refuse, before writing anything, a volume that cannot fit where it is to be written (a mistyped size would
    otherwise fill the disk block by block)."""
    need = float(np.prod(np.asarray(shape_zyx, dtype=np.float64))) * BYTES_PER_VOXEL
    where = dst
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConnectomeError(f"synth {tuple(int(v) for v in shape_zyx)} (zyx) needs about {need / 1e9:,.1f} GB "
                              f"but {where} has {free / 1e9:,.1f} GB free")


def write_synthetic(dst: str | os.PathLike, params: SynthParams, *, client, block_shape=None, chunk_shape=None,
                    restart: bool = False, progress: bool = True) -> dict[str, Any]:
    from pipeline.runner import run_blockwise
    from storage.volume import create_volume

    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConnectomeError(f"synth destination {dst} exists and is not a directory")
    check_disk_space(dst, params.shape_zyx)
    dst.mkdir(parents=True, exist_ok=True)
    done_marker = dst / "synth.json"
    if done_marker.exists():
        done_marker.unlink()   # rewriting: do not look finished until we are
    chunk = tuple(chunk_shape or default_chunk_shape(params.shape_zyx))
    block = tuple(block_shape or default_block_shape(params.shape_zyx, chunk))
    grid = BlockGrid(Box((0, 0, 0), params.shape_zyx), block, alignment=chunk)
    ledger_dir = dst / ".ledger"
    if restart or not ledger_dir.exists():
        specs = {}
        for name, (dtype, kind) in LAYERS.items():
            vol = create_volume(str(dst / name), shape_zyx=params.shape_zyx, dtype=dtype,
                                voxel_size_xyz_nm=params.voxel_size_xyz_nm, chunk_shape_zyx=chunk, kind=kind,
                                delete_existing=True)
            specs[name] = vol.spec
    else:
        from storage.volume import open_volume

        specs = {name: open_volume(str(dst / name), mode="r+", fill_missing=True).spec for name in LAYERS}
    results = run_blockwise("synth", grid, synth_block, params={"params": params.to_json(), "specs": specs},
                            client=client, ledger_dir=ledger_dir, restart=restart, progress=progress)
    blocks = []
    for bid in sorted(results):
        r = results[bid]
        syn = pd.DataFrame(r["synapses"], columns=SYNAPSE_COLUMNS)
        seg = pd.DataFrame(r["segments"], columns=["segment_id", "cell_type", "voxels"])
        for c in ("synapse_id", "pre_segment_id", "post_segment_id"):
            syn[c] = syn[c].astype(np.uint64)
        seg["segment_id"] = seg["segment_id"].astype(np.uint64)
        cle = pd.DataFrame(r.get("clefts", []), columns=["synapse_id", "voxels"])
        cle["synapse_id"] = cle["synapse_id"].astype(np.uint64)
        blocks.append((syn, seg, cle))
    synapses, cell_types = merge_tables(blocks)
    synapses.to_parquet(dst / "synapses.parquet", index=False)
    cell_types.to_parquet(dst / "cell_types.parquet", index=False)
    summary = {
        "dst": str(dst), "shape_zyx": list(params.shape_zyx), "voxel_size_xyz_nm": list(params.voxel_size_xyz_nm),
        "blocks": grid.num_blocks, "block_shape_zyx": list(block), "chunk_shape_zyx": list(chunk),
        "segments": int(len(cell_types)), "synapses": int(len(synapses)),
        "cell_type_counts": {k: int(v) for k, v in cell_types["cell_type"].value_counts().sort_index().items()},
        "layers": {name: str(dst / name) for name in LAYERS},
        "params": params.to_json(),
    }
    tmp = dst / "synth.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(done_marker)
    return summary


def read_tables(dst: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(synapses, cell_types) of a written synthetic volume."""
    dst = Path(dst)
    if not (dst / "synth.json").exists():
        raise ConnectomeError(f"{dst} is not a finished synthetic volume (no synth.json)")
    return pd.read_parquet(dst / "synapses.parquet"), pd.read_parquet(dst / "cell_types.parquet")
