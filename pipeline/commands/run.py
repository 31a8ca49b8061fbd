"""`connectome run CONFIG`: every configured stage over a volume, on the configured Dask cluster."""

from __future__ import annotations

import argparse
import json

HELP = "run the pipeline stages named in a YAML/JSON config (segment, synapses, skeletonize, embed, classify, publish)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/JSON run config (see examples/)")
    parser.add_argument("--cluster", default=None, help="override cluster.kind: local | address | slurm | kubernetes")
    parser.add_argument("--workers", type=int, default=None, help="override cluster.workers")
    parser.add_argument("--address", default=None, help="scheduler address for --cluster address")
    parser.add_argument("--restart", action="store_true", help="ignore ledgers and finished-stage records")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.cluster import open_client
    from pipeline.config import load_config, read_config_file
    from pipeline.run import RunConfig, run_pipeline

    data = read_config_file(Path(args.config))
    if isinstance(data, dict):
        cluster = dict(data.get("cluster") or {})
        for key, value in (("kind", args.cluster), ("workers", args.workers), ("address", args.address)):
            if value is not None:
                cluster[key] = value
        data = {**data, "cluster": cluster}
    config = load_config(data, RunConfig, source=args.config)
    if args.restart:
        config.segment.restart = True
        state = Path(config.output) / "run_state.json"
        if state.exists():
            state.unlink()
    with open_client(config.cluster) as client:
        stages = run_pipeline(config, client)
    print(json.dumps({"stages": stages}, default=str))
    return 0
