"""segment: FFN flood filling per block, written as block-unique fragments.

A block segments its whole read box (write box + overlap) so that objects crossing a face are seen with context
from both sides; it writes only its write box into the fragments volume (one writer per chunk/shard) and keeps
the read-box labels in a small side file, which reconcile needs to compare the two blocks' views of the overlap.
Fragment ids are ``block_id * stride + local_id``: unique by construction, no coordination between blocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from storage.box import Block
from storage.volume import open_volume

_MODEL_CACHE: dict[str, Any] = {}


def _model(model_dir: str):
    """One model per worker process: loading weights per block would dominate small blocks."""
    if model_dir not in _MODEL_CACHE:
        from ffn.model import load_model

        _MODEL_CACHE[model_dir] = load_model(model_dir)
    return _MODEL_CACHE[model_dir]


def side_file(work_dir: str | Path, block_id: int) -> Path:
    return Path(work_dir) / f"block-{block_id}.npz"


def save_side_file(path: Path, labels: np.ndarray) -> None:
    """Atomic: a half-written file must never look finished to reconcile (write to a temp name, rename)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, labels=labels)
    os.replace(tmp, path)


def load_side_file(work_dir: str | Path, block_id: int) -> np.ndarray:
    with np.load(side_file(work_dir, block_id)) as f:
        return f["labels"]


def to_global(local: np.ndarray, block_id: int, stride: int) -> np.ndarray:
    out = local.astype(np.uint64)
    fg = out != 0
    out[fg] += np.uint64(block_id) * np.uint64(stride)
    return out


def segment_block(
    block: Block,
    *,
    input_spec: dict,
    fragments_spec: dict,
    work_dir: str,
    model_dir: str,
    stride: int,
    inference: dict,
    fill_missing: bool = False,
) -> dict:
    """FFN over the read box -> fragments in the write box; returns fragment ids and sizes (small metadata)."""
    from ffn.inference import segment_volume

    image = open_volume(input_spec, fill_missing=fill_missing).read(block.read)
    model, config = _model(model_dir)
    local, stats = segment_volume(image, model, config, **inference)
    local = np.asarray(local)
    if local.max(initial=0) >= stride:
        raise RuntimeError(f"block {block.block_id}: {int(local.max())} local ids exceed the id stride {stride}")
    save_side_file(side_file(work_dir, block.block_id), local.astype(np.uint32))
    global_ids = to_global(local, block.block_id, stride)
    write_part = global_ids[block.write.relative_to(block.read).slices]
    open_volume(fragments_spec, mode="r+").write(block.write, write_part)
    ids = np.unique(global_ids)
    ids = ids[ids != 0]
    w_ids, w_counts = np.unique(write_part, return_counts=True)
    keep = w_ids != 0
    return {
        "fragments": ids.tolist(),
        "write_ids": w_ids[keep].tolist(),
        "write_sizes": w_counts[keep].tolist(),
        "steps": int(stats.get("steps", 0)),
        "segments": int(stats.get("segments", len(ids))),
    }
