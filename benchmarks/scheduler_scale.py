"""How the runner's driver scales: 10^5 no-op blocks on a LocalCluster, plus a simulated 10^6-block ledger.

Measures driver memory (RSS) sampled against blocks done (the bounded in-flight window should keep it flat),
submission/completion rate, ledger write and read time, and the resume check of a 10^6-block ledger
(target <= 5 s). Last stdout line: JSON.

    python benchmarks/scheduler_scale.py [--blocks 100000] [--ledger-blocks 1000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from pipeline.cluster import ClusterConfig, open_client  # noqa: E402
from pipeline.runner import run_blockwise, stage_fingerprint  # noqa: E402
from storage.box import Box, BlockGrid  # noqa: E402
from storage.ledger import Ledger  # noqa: E402


def noop_block(block):
    """Returns a small dict so results really travel and get stored (the common case for real stages)."""
    return {"n": block.block_id & 0xFF}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def run_blocks(n: int, workers: int, ledger_dir: Path) -> dict:
    grid = BlockGrid(Box.from_shape((1, 1, n)), (1, 1, 1))
    samples: list[tuple[int, float]] = []
    step = max(1, n // 20)
    next_sample = [0]

    def sample(done: int, total: int) -> None:
        if done >= next_sample[0]:
            samples.append((done, rss_mb()))
            next_sample[0] = done + step
            print(f"{done}/{total} blocks, {time.perf_counter() - start:.0f} s, driver RSS {samples[-1][1]:.1f} MiB",
                  file=sys.stderr, flush=True)

    start = time.perf_counter()
    with open_client(ClusterConfig(workers=workers, dashboard=False)) as client:
        client.run(lambda: None)
        rss_before = rss_mb()
        start = time.perf_counter()
        results = run_blockwise("noop", grid, noop_block, params={}, client=client, ledger_dir=ledger_dir,
                                progress=sample)
        elapsed = time.perf_counter() - start
        submit = submission_rate(client, grid)
    assert len(results) == n
    del results
    fingerprint = stage_fingerprint("noop", grid, noop_block, {})
    start = time.perf_counter()
    with Ledger.open(ledger_dir, "noop", fingerprint, n) as ledger:
        assert ledger.done_count == n
    read_s = time.perf_counter() - start
    first = next((mb for done, mb in samples if done >= n // 10), samples[0][1])
    return {
        "blocks": n,
        "run_s": elapsed,
        "blocks_per_s": n / elapsed,
        "rss_before_mb": rss_before,
        "rss_at_10pct_mb": first,
        "rss_at_end_mb": samples[-1][1],
        "rss_growth_10pct_to_end_mb": samples[-1][1] - first,
        "rss_samples": [[d, round(m, 1)] for d, m in samples],
        "ledger_read_s": read_s,
        **submit,
    }


def submission_rate(client, grid: BlockGrid, n: int = 20_000, chunk: int = 1000) -> dict:
    """Driver-side cost of submitting blocks the way the runner does (client.map chunks with explicit keys)."""
    from distributed import wait

    n = min(n, grid.num_blocks)
    futures, spent = [], 0.0
    for lo in range(0, n, chunk):
        ids = range(lo, min(n, lo + chunk))
        blocks = [grid.block(i) for i in ids]
        start = time.perf_counter()
        futures += client.map(noop_block, blocks, key=[f"submit-{i}" for i in ids], pure=False)
        spent += time.perf_counter() - start
    wait(futures)
    return {"submit_blocks": n, "submit_blocks_per_s": n / spent}


def simulated_ledger(n: int, directory: Path, batch: int = 2000) -> dict:
    """Write a finished ledger of n blocks in runner-sized batches, then time the resume check."""
    fingerprint = {"stage": "sim", "grid": {"blocks": n}, "params": {}}
    ids = np.arange(n)
    done_fraction = 0.9  # a run killed at 90 %: the resume check must find the last 10 %
    cut = int(n * done_fraction)
    start = time.perf_counter()
    with Ledger.open(directory, "sim", fingerprint, n, flush_every=batch) as ledger:
        for lo in range(0, cut, batch):
            chunk = ids[lo:min(cut, lo + batch)].tolist()
            ledger.add(chunk, [{"n": i & 0xFF} for i in chunk])
    write_s = time.perf_counter() - start
    size = (directory / "sim" / "blocks.log").stat().st_size
    start = time.perf_counter()
    with Ledger.open(directory, "sim", fingerprint, n) as ledger:
        todo = sum(chunk.size for chunk in ledger.todo_chunks())
        results = len(ledger.results)
    resume_s = time.perf_counter() - start
    assert todo == n - cut and results == cut
    return {"ledger_blocks": n, "ledger_write_s": write_s, "ledger_bytes": size, "resume_check_s": resume_s,
            "resume_todo": todo}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--ledger-blocks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scheduler-scale-") as tmp:
        sim = simulated_ledger(args.ledger_blocks, Path(tmp) / "sim")
        print(f"simulated ledger: {args.ledger_blocks} blocks written in {sim['ledger_write_s']:.2f} s "
              f"({sim['ledger_bytes'] / 2**20:.1f} MiB), resume check {sim['resume_check_s']:.2f} s", flush=True)
        run = run_blocks(args.blocks, args.workers, Path(tmp) / "run")
    print(f"runner: {args.blocks} no-op blocks in {run['run_s']:.1f} s ({run['blocks_per_s']:.0f} blocks/s); "
          f"driver RSS {run['rss_at_10pct_mb']:.0f} MiB at 10 % -> {run['rss_at_end_mb']:.0f} MiB at the end; "
          f"ledger read {run['ledger_read_s']:.2f} s")
    print(json.dumps({**run, **sim, "resume_target_s": 5.0, "resume_ok": sim["resume_check_s"] <= 5.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
