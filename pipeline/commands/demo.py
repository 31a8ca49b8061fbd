"""`connectome demo`: the whole pipeline on a generated volume, scored against its ground truth, then the viewer."""

from __future__ import annotations

import argparse

HELP = "run every stage on a synthetic EM volume, print a scored summary (last line JSON) and serve the viewer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", nargs=3, type=int, default=(128, 256, 256), metavar=("Z", "Y", "X"),
                        help="synthetic volume shape, Z Y X voxels (default 128 256 256)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--out", default="demo_run", help="output directory (default ./demo_run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-view", dest="view", action="store_false", help="do not serve the viewer at the end")
    parser.add_argument("--cluster", default="local", help="local | address | slurm | kubernetes")
    parser.add_argument("--address", default=None, help="scheduler address for --cluster address")
    parser.add_argument("--port", type=int, default=0, help="viewer port (default: a free one)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.demo import format_summary, run_demo, summary_json

    cluster = ClusterConfig(kind=args.cluster, workers=args.workers, threads_per_worker=1, address=args.address)
    with open_client(cluster) as client:
        summary = run_demo(Path(args.out), size=tuple(args.size), seed=args.seed, client=client)
    print(format_summary(summary))
    if not args.view:
        print(summary_json(summary))
        return 0
    from viz.viewer import serve_run

    with serve_run(summary["run"], port=args.port) as url:
        summary["viewer_url"] = url
        print(f"viewer: {url}  (Ctrl-C to stop)")
        print(summary_json(summary), flush=True)
        import time

        while True:
            time.sleep(3600)
