"""Per-block overhead of run_blockwise vs a plain client.map of the same no-op function on the same cluster.

What the runner adds on top of Dask: chunked streaming submission with a bounded window, batched gathering,
the ledger (batched appends + fsync) and progress. Target: runner <= 1.2x plain map.
Last stdout line: JSON with runner_s_per_block, map_s_per_block, ratio (best of --repeats interleaved runs each;
also the median of per-repeat ratios, the driver CPU per block, and the load average, since wall time on a shared
machine is noisy).

    python benchmarks/blockwise_overhead.py [--blocks 2000] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed import wait  # noqa: E402

from pipeline.cluster import ClusterConfig, open_client  # noqa: E402
from pipeline.runner import run_blockwise  # noqa: E402
from storage.box import Box, BlockGrid  # noqa: E402


def noop_block(block, **params):
    """The no-op block function both sides run."""
    return None


def time_plain_map(client, grid: BlockGrid, tag: str) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    blocks = [grid.block(i) for i in range(grid.num_blocks)]
    futures = client.map(noop_block, blocks, key=[f"map-{tag}-{i}" for i in range(grid.num_blocks)], pure=False)
    wait(futures)
    client.gather(futures)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    del futures
    return elapsed, cpu


def time_runner(client, grid: BlockGrid, ledger_dir: Path, tag: str) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    results = run_blockwise(f"noop-{tag}", grid, noop_block, params={}, client=client, ledger_dir=ledger_dir,
                            progress=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(results) == grid.num_blocks
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    grid = BlockGrid(Box.from_shape((1, 1, args.blocks)), (1, 1, 1))
    runner_times, map_times, runner_cpu, map_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="blockwise-overhead-") as tmp, \
            open_client(ClusterConfig(workers=args.workers, threads_per_worker=args.threads,
                                      dashboard=False)) as client:
        client.run(lambda: None)  # warm the workers
        time_plain_map(client, BlockGrid(Box.from_shape((1, 1, 200)), (1, 1, 1)), "warmup")
        time_runner(client, BlockGrid(Box.from_shape((1, 1, 200)), (1, 1, 1)), Path(tmp), "warmup")
        for r in range(args.repeats):  # interleave so both sides see the same machine load
            wall, cpu = time_plain_map(client, grid, str(r))
            map_times.append(wall)
            map_cpu.append(cpu)
            wall, cpu = time_runner(client, grid, Path(tmp), str(r))
            runner_times.append(wall)
            runner_cpu.append(cpu)
            print(f"repeat {r}: map {map_times[-1]:.3f} s, runner {runner_times[-1]:.3f} s", file=sys.stderr)
    runner_s = min(runner_times) / args.blocks
    map_s = min(map_times) / args.blocks
    print(f"{args.blocks} no-op blocks on {args.workers}x{args.threads} workers (best of {args.repeats}): "
          f"runner {runner_s * 1e3:.3f} ms/block, client.map {map_s * 1e3:.3f} ms/block, "
          f"overhead {(runner_s - map_s) * 1e3:.3f} ms/block")
    print(json.dumps({"runner_s_per_block": runner_s, "map_s_per_block": map_s, "ratio": runner_s / map_s,
                      "runner_driver_cpu_s_per_block": min(runner_cpu) / args.blocks,
                      "map_driver_cpu_s_per_block": min(map_cpu) / args.blocks,
                      "median_ratio": statistics.median(r / m for r, m in zip(runner_times, map_times)),
                      "load_average_1min": os.getloadavg()[0],
                      "blocks": args.blocks, "workers": args.workers, "threads_per_worker": args.threads,
                      "repeats": args.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
