"""Block functions and a driver script for the runner tests (a plain module so spawned workers can import it).

`write_block` is a real block function: it opens a TensorStore zarr3 volume from its spec inside the worker,
writes a deterministic pattern into exactly its write box, and returns small metadata (checksum, where it ran).
Run as a script, this module is the driver that tests/test_runner.py kills mid-run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

GRID_SHAPE = (10, 10, 10)  # blocks (zyx) -> 1,000 blocks
BLOCK_SHAPE = (4, 4, 4)
VOLUME_SHAPE = tuple(g * b for g, b in zip(GRID_SHAPE, BLOCK_SHAPE))


def zarr3_spec(path: str | Path) -> dict:
    # no fsync per chunk: durability is not what these tests are about, and fsync is slow in sandboxes
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "context": {"file_io_sync": False}}


_STORES: dict[str, object] = {}


def open_store(spec: dict):
    """One handle per worker process and spec (opening costs more than writing a tiny block)."""
    import tensorstore as ts

    key = json.dumps(spec, sort_keys=True)
    if key not in _STORES:
        _STORES[key] = ts.open(spec, open=True).result()
    return _STORES[key]


def create_volume(path: str | Path) -> dict:
    """Create the empty output (metadata written once, on the driver, before workers start)."""
    import tensorstore as ts

    spec = dict(zarr3_spec(path), create=True, delete_existing=True, metadata={
        "shape": list(VOLUME_SHAPE), "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(BLOCK_SHAPE)}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
    })
    ts.open(spec).result()
    return zarr3_spec(path)


def grid():
    from storage.box import Box, BlockGrid

    return BlockGrid(Box.from_shape(VOLUME_SHAPE), BLOCK_SHAPE, alignment=BLOCK_SHAPE)


def pattern(block, seed: int) -> np.ndarray:
    """The bytes a block must write: a function of (seed, block id) only."""
    rng = np.random.default_rng([seed, block.block_id])
    return rng.integers(0, 2**16, size=block.write.shape, dtype=np.uint16)


def expected_volume(seed: int) -> np.ndarray:
    out = np.zeros(VOLUME_SHAPE, dtype=np.uint16)
    for block in grid():
        out[block.write.slices] = pattern(block, seed)
    return out


def write_block(block, *, spec: dict, seed: int, sleep: float = 0.0, calls_dir: str | None = None,
                fail_block: int | None = None):
    """Write the pattern of `block`; record the call (for counting re-runs); return checksum and worker."""
    from distributed import get_worker

    from storage.errors import VolumeError

    if calls_dir is not None:
        Path(calls_dir, f"{block.block_id}-{uuid.uuid4().hex}").touch()
    if fail_block == block.block_id:
        raise VolumeError(f"cannot read input chunk for block {block.block_id} (test failure)")
    if sleep:
        time.sleep(sleep)
    data = pattern(block, seed)
    store = open_store(spec)
    store[block.write.slices].write(data).result()
    return {"sum": int(data.sum(dtype=np.uint64)), "worker": get_worker().address, "pid": os.getpid()}


def noop_block(block, **params):
    return None


def main(argv: list[str]) -> int:
    """Driver: run_blockwise of write_block on an existing scheduler; args: JSON of settings."""
    from distributed import Client

    from pipeline.runner import run_blockwise

    import runner_blocks  # the importable module, not __main__: workers must find the function by name

    settings = json.loads(argv[0])
    with Client(settings["address"]) as client:
        run_blockwise("write", runner_blocks.grid(), runner_blocks.write_block, params=settings["params"], client=client,
                      ledger_dir=settings["ledger_dir"], progress=False, ledger_flush_seconds=0.05,
                      max_in_flight=16)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
