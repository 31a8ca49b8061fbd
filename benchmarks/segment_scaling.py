"""Whole-volume segmentation on 1 vs 2 Dask workers: wall time per stage, voxels/s, speed-up, worker memory.

A synthetic volume (pipeline.synthetic, seed 21: not a training seed) is segmented with the small FFN by
`run_segmentation` on a fresh LocalCluster of 1 and then 2 worker processes (1 thread each; each block's TF
forward passes on 1 core, so 2 workers can use the 2 cores of this machine and 1 worker uses one). Workers load
the model before the clock starts (the same for both runs), so the figures are steady-state throughput.
Peak memory per worker = the highest RSS of any worker process, sampled every 0.25 s with psutil inside the
workers (client.run) from a side thread.

Targets (issue 4): speed-up 1 -> 2 workers >= 1.7, reconcile + relabel <= 10 % of the total.
The default size finishes in a few minutes on an idle 2-core machine; `--size 256` is the issue's 256^3.
Load from other processes on the machine slows the runs unevenly; the runs of the two configurations are
interleaved (`--repeats`, order alternated) and the medians compared, and the load average is recorded per run
so a reader can judge the speed-up.

    python benchmarks/segment_scaling.py [--size 128] [--block 64 64 64] [--overlap 8 16 16] [--model synthetic_small]

Last stdout line: JSON with speedup, reconcile_relabel_fraction, voxels_per_s_2_workers, peak_worker_mb, ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from pipeline.cluster import ClusterConfig, open_client  # noqa: E402
from pipeline.segmentation import SegmentConfig, run_segmentation  # noqa: E402
from pipeline.synthetic import SynthParams, generate_box  # noqa: E402
from storage.box import Box  # noqa: E402
from storage.volume import create_volume  # noqa: E402

SEED = 21


def write_synthetic(root: Path, shape_zyx: tuple[int, int, int]) -> str:
    params = SynthParams(seed=SEED, shape_zyx=shape_zyx)
    arrays = generate_box(params, Box.from_shape(shape_zyx))
    url = str(root / "raw.zarr")
    vol = create_volume(url, shape_zyx=shape_zyx, dtype="uint8", voxel_size_xyz_nm=params.voxel_size_xyz_nm,
                        chunk_shape_zyx=(32, 64, 64))
    vol.write(vol.bounds, arrays["raw"])
    return url


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _warm(model_dir: str) -> bool:
    from pipeline.stages.segment import _model

    _model(model_dir, 1)
    return True


class MemorySampler:
    """Highest RSS per worker while running (a side thread calling client.run every `interval` seconds)."""

    def __init__(self, client, interval: float = 0.25):
        self.client, self.interval = client, interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for worker, rss in self.client.run(_rss).items():
                    self.peak[worker] = max(self.peak.get(worker, 0), int(rss))
            except Exception:  # a worker restarting between samples is not an error of the benchmark
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_once(workers: int, url: str, out: Path, model: str, block, overlap) -> dict:
    from ffn.model import resolve_model

    model_dir = str(resolve_model(model))
    config = SegmentConfig(input=url, output=str(out), model=model_dir, block_shape=tuple(block),
                           overlap=tuple(overlap), tf_threads=1)
    with open_client(ClusterConfig(workers=workers, threads_per_worker=1, dashboard=False)) as client:
        client.run(_warm, model_dir)
        with MemorySampler(client) as mem:
            t0 = time.perf_counter()
            summary = run_segmentation(config, client, progress=False)
            wall = time.perf_counter() - t0
    stages = summary["stage_seconds"]
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "stage_seconds": stages,
        "voxels_per_s": round(summary["voxels"] / wall, 1),
        "peak_worker_mb": round(max(mem.peak.values(), default=0) / 2**20, 1),
        "reconcile_relabel_fraction": round((stages.get("reconcile", 0) + stages.get("relabel", 0)) / wall, 4),
        "segment_fraction": round(stages.get("segment", 0) / wall, 4),
        "blocks": summary["blocks"], "segments": summary["segments"], "steps": summary["steps"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="cube side in voxels (issue figure: 256)")
    parser.add_argument("--block", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                        help="write box (default: size/2 per axis, capped at 128)")
    parser.add_argument("--overlap", nargs=3, type=int, default=[8, 16, 16], metavar=("Z", "Y", "X"))
    parser.add_argument("--model", default="synthetic_small")
    parser.add_argument("--workdir", default=None, help="where volumes and runs go (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, order alternated; median")
    args = parser.parse_args()
    block = args.block or [min(128, args.size // 2)] * 3
    shape = (args.size,) * 3

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        url = write_synthetic(root, shape)
        print(f"synthetic {shape} (zyx) seed {SEED}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        load_before = os.getloadavg()
        all_runs: dict[int, list[dict]] = {1: [], 2: []}
        for rep in range(args.repeats):
            # alternate the order (1,2), (2,1), ... so that a change in the machine's load hits both alike
            for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):
                r = run_once(workers, url, root / f"run{workers}-{rep}", args.model, block, args.overlap)
                r["loadavg_1min"] = round(os.getloadavg()[0], 2)
                all_runs[workers].append(r)
                print(f"{workers} worker(s): {r['wall_s']:8.1f} s  {r['voxels_per_s']:9.0f} vox/s  peak "
                      f"{r['peak_worker_mb']:7.0f} MB/worker  load {r['loadavg_1min']}  stages {r['stage_seconds']}",
                      file=sys.stderr)
        load_after = os.getloadavg()

    # the median run (by wall time) of each configuration
    runs = {w: sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2] for w, rs in all_runs.items()}
    one, two = runs[1], runs[2]
    print(f"{'stage':<12} {'1 worker s':>11} {'2 workers s':>12}")
    for stage in two["stage_seconds"]:
        print(f"{stage:<12} {one['stage_seconds'].get(stage, 0):11.1f} {two['stage_seconds'][stage]:12.1f}")
    print(f"{'total':<12} {one['wall_s']:11.1f} {two['wall_s']:12.1f}")
    result = {
        "size_zyx": list(shape), "block_zyx": block, "overlap_zyx": args.overlap, "model": args.model,
        "speedup": round(one["wall_s"] / two["wall_s"], 3),
        "segment_speedup": round(one["stage_seconds"]["segment"] / two["stage_seconds"]["segment"], 3),
        "reconcile_relabel_fraction": two["reconcile_relabel_fraction"],
        "voxels_per_s_1_worker": one["voxels_per_s"],
        "voxels_per_s_2_workers": two["voxels_per_s"],
        "peak_worker_mb": max(one["peak_worker_mb"], two["peak_worker_mb"]),
        "wall_s_1_worker": one["wall_s"], "wall_s_2_workers": two["wall_s"],
        "stage_seconds_1_worker": one["stage_seconds"], "stage_seconds_2_workers": two["stage_seconds"],
        "blocks": two["blocks"], "segments_2_workers": two["segments"], "segments_1_worker": one["segments"],
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
        "cpu_count": os.cpu_count(), "repeats": args.repeats,
        "wall_s_all_runs": {str(w): [r["wall_s"] for r in rs] for w, rs in all_runs.items()},
        "loadavg_during_runs": {str(w): [r["loadavg_1min"] for r in rs] for w, rs in all_runs.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
