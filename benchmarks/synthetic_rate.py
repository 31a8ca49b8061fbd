"""Voxels per second of the synthetic EM generator, blockwise on a 2-worker Dask LocalCluster, writing zarr3.

Usage: python benchmarks/synthetic_rate.py [--shape Z Y X] [--voxel-size X Y Z] [--workers N]
Prints the figures; the last line is JSON with `voxels_per_s` (whole run: cluster already up, blocks generated and
written) and `block_voxels_per_s` (one block generated in this process, warm, no writing) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=(128, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--voxel-size", nargs=3, type=float, default=(8.0, 8.0, 40.0), metavar=("X", "Y", "Z"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.synthetic import SynthParams, generate_block
    from pipeline.synthetic.write import write_synthetic

    params = SynthParams(seed=args.seed, shape_zyx=tuple(args.shape), voxel_size_xyz_nm=tuple(args.voxel_size))
    voxels = int(params.shape_zyx[0] * params.shape_zyx[1] * params.shape_zyx[2])
    with tempfile.TemporaryDirectory() as tmp, open_client(ClusterConfig(workers=args.workers, dashboard=False)) as client:
        t0 = time.perf_counter()
        summary = write_synthetic(Path(tmp) / "synth", params, client=client, progress=False)
        seconds = time.perf_counter() - t0
    rate = voxels / seconds
    print(f"{voxels:,} voxels ({'x'.join(map(str, args.shape))} zyx at {args.voxel_size} nm) in {seconds:.1f} s on "
          f"{args.workers} workers: {rate:,.0f} voxels/s; {summary['blocks']} blocks, {summary['segments']} segments, "
          f"{summary['synapses']} synapses")
    # one block in this process for reference (first call warms the object caches)
    bs = summary["block_shape_zyx"]
    box = ((0, 0, 0), tuple(min(b, s) for b, s in zip(bs, params.shape_zyx)))
    generate_block(params, box)
    t0 = time.perf_counter()
    generate_block(params, box)
    one = time.perf_counter() - t0
    bvox = int(box[1][0] * box[1][1] * box[1][2])
    print(f"one {box[1]} block, warm, in-process: {one:.2f} s = {bvox / one:,.0f} voxels/s")
    print(json.dumps({"voxels_per_s": round(rate), "seconds": round(seconds, 2), "voxels": voxels,
                      "workers": args.workers, "blocks": summary["blocks"], "block_voxels_per_s": round(bvox / one),
                      "load_average_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
