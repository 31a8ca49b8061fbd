"""Read/write throughput of a uint8 zarr3 sharded volume through storage.Volume vs TensorStore called directly.

Both sides use the same TensorStore spec (the Volume's own `spec`), the same Context (cache + concurrency
limits), the same data and
the same access pattern (one shard-aligned box per shard, in order). Each side writes its own fresh volume (so
neither pays for overwriting the other's shards). The two sides are interleaved box by box, alternating which goes
first, so both see the same machine load, page cache and warm-up (a shared machine's load swings more than the
difference being measured). What is measured is what storage/ adds on top of TensorStore: box checks, dtype checks,
the ZYX view and error wrapping. Target: ratio >= 0.9.

    python benchmarks/io_throughput.py            # 1 GiB (1024^3 voxels), uses --dir (default /tmp), cleans up
    python benchmarks/io_throughput.py --size-mb 64

Last stdout line: {"read_mb_s", "write_mb_s", "read_ratio", "write_ratio", ...} (ours; ratio = ours / direct).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from storage.box import BlockGrid, Box
from storage.volume import context_spec, create_volume, open_volume, ts_context


def _shape_for(size_mb: int) -> tuple[int, int, int]:
    """size_mb MiB of uint8: (size_mb, 1024, 1024) zyx, i.e. 1024^3 at 1 GiB."""
    return (max(1, size_mb), 1024, 1024)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024, help="volume size in MiB (default 1024 = 1 GiB)")
    p.add_argument("--shard", type=int, default=256, help="shard edge in voxels (default 256)")
    p.add_argument("--chunk", type=int, default=64, help="inner chunk edge in voxels (default 64)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds; medians are reported (default 4)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="scratch directory (default /tmp)")
    args = p.parse_args()

    shape = _shape_for(args.size_mb)
    shard = tuple(min(args.shard, s) for s in shape)
    chunk = tuple(min(args.chunk, s) for s in shard)
    nbytes = int(np.prod(shape))
    mb = nbytes / 2**20
    rng = np.random.default_rng(0)
    # EM-like noise; one shard-sized array reused for every box so data generation is not timed
    data = np.clip(rng.normal(128, 20, shard), 0, 255).astype(np.uint8)
    grid = BlockGrid(Box.from_shape(shape), shard, alignment=shard)
    boxes = [b.write for b in grid]
    scratch = Path(tempfile.mkdtemp(prefix="io_throughput_", dir=args.dir))
    results: dict[str, dict[str, list[float]]] = {"ours": {"write": [], "read": []},
                                                 "direct": {"write": [], "read": []}}
    print(f"volume {shape} zyx uint8 = {mb:.0f} MiB, shard {shard}, chunk {chunk}, {len(boxes)} boxes, "
          f"context {context_spec()}", flush=True)
    try:
        for rnd in range(args.rounds):
            ops = {}
            for side in ("ours", "direct"):
                url = str(scratch / f"{side}.zarr")
                vol = create_volume(url, shape_zyx=shape, dtype="uint8", voxel_size_xyz_nm=(8, 8, 8),
                                    chunk_shape_zyx=chunk, shard_shape_zyx=shard if shard != chunk else None,
                                    delete_existing=True)
                spec = vol.spec
                del vol
                if side == "ours":
                    v = open_volume(spec, mode="r+")
                    ops[side] = (lambda box, arr, v=v: v.write(box, arr), lambda box, v=v: v.read(box))
                else:
                    store = ts.open(spec, read=True, write=True, context=ts_context()).result()
                    ops[side] = (lambda box, arr, s=store: s[box.slices].write(arr).result(),
                                 lambda box, s=store: s[box.slices].read().result())
            seconds = {side: {"write": 0.0, "read": 0.0} for side in ops}
            # Interleave box by box, alternating who goes first, so both sides see the same machine load.
            for phase in ("write", "read"):
                for i, box in enumerate(boxes):
                    arr = data[tuple(slice(0, s) for s in box.shape)]
                    order = ("ours", "direct") if (i + rnd) % 2 == 0 else ("direct", "ours")
                    for side in order:
                        op = ops[side][0 if phase == "write" else 1]
                        seconds[side][phase] += _time(lambda: op(box, arr) if phase == "write" else op(box))
            for side in ops:
                for phase in ("write", "read"):
                    results[side][phase].append(mb / seconds[side][phase])
                print(f"round {rnd} {side:6s}: write {results[side]['write'][-1]:8.1f} MB/s  "
                      f"read {results[side]['read'][-1]:8.1f} MB/s", flush=True)
            ops.clear()
            for side in ("ours", "direct"):
                shutil.rmtree(scratch / f"{side}.zarr", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in results.items()}
    out = {
        "read_mb_s": round(med["ours"]["read"], 1),
        "write_mb_s": round(med["ours"]["write"], 1),
        "direct_read_mb_s": round(med["direct"]["read"], 1),
        "direct_write_mb_s": round(med["direct"]["write"], 1),
        "read_ratio": round(med["ours"]["read"] / med["direct"]["read"], 3),
        "write_ratio": round(med["ours"]["write"] / med["direct"]["write"], 3),
        "size_mb": round(mb, 1),
        "shard_zyx": list(shard),
        "chunk_zyx": list(chunk),
        "rounds": args.rounds,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
