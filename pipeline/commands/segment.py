"""`connectome segment`: FFN segmentation of a whole volume on Dask (segment -> reconcile -> agglomerate -> relabel)."""

from __future__ import annotations

import argparse
import json

HELP = "segment a volume with an FFN model, blockwise on Dask, into OUT/segmentation (precomputed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML/JSON run config (a `segment:` section or the fields directly)")
    parser.add_argument("--input", help="EM volume URL or path (uint8)")
    parser.add_argument("--output", help="run directory; the result is OUT/segmentation")
    parser.add_argument("--model", help="FFN model name (packaged) or directory")
    parser.add_argument("--block-shape", nargs=3, type=int, metavar=("Z", "Y", "X"), help="write box shape")
    parser.add_argument("--overlap", nargs=3, type=int, metavar=("Z", "Y", "X"), help="overlap (halo) per side")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker")
    parser.add_argument("--cluster", default=None, help="local | address | slurm | kubernetes (default local)")
    parser.add_argument("--address", default=None, help="scheduler address for --cluster address")
    parser.add_argument("--gpu", action="store_true", default=None, help="declare GPU=1 for FFN blocks")
    parser.add_argument("--agglomerate", action=argparse.BooleanOptionalAction, default=None,
                        help="merge over-segmented neighbours (default: as recorded with the model)")
    parser.add_argument("--fill-missing", action="store_true", default=None, help="read missing input chunks as 0")
    parser.add_argument("--restart", action="store_true", default=None, help="ignore existing ledgers")


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from pipeline.config import load_config, read_config_file
    from pipeline.segmentation import SegmentConfig

    raw: dict = {}
    if args.config:
        data = read_config_file(Path(args.config)) or {}
        raw = dict(data.get("segment", data)) if isinstance(data, dict) else data
        if isinstance(raw, dict):
            raw.pop("cluster", None)
    flags = {
        "input": args.input, "output": args.output, "model": args.model,
        "block_shape": args.block_shape, "overlap": args.overlap, "gpu": args.gpu,
        "agglomerate": args.agglomerate, "fill_missing": args.fill_missing, "restart": args.restart,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    return load_config(raw, SegmentConfig, source=args.config or "command line")


def cluster_config(args: argparse.Namespace, gpu: bool):
    """The `cluster:` section of the config file, overridden by --cluster/--workers/--threads/--address."""
    from pathlib import Path

    from pipeline.cluster import ClusterConfig
    from pipeline.config import load_config, read_config_file

    raw: dict = {}
    if getattr(args, "config", None):
        data = read_config_file(Path(args.config)) or {}
        if isinstance(data, dict) and isinstance(data.get("cluster"), dict):
            raw = dict(data["cluster"])
    flags = {"kind": args.cluster, "workers": args.workers, "threads_per_worker": args.threads,
             "address": args.address}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if gpu and "gpu_workers" not in raw:
        raw["gpu_workers"] = raw.get("workers", 2)
    return load_config(raw, ClusterConfig, source=args.config or "command line")


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import open_client
    from pipeline.segmentation import run_segmentation

    config = build_config(args)
    with open_client(cluster_config(args, gpu=bool(config.gpu))) as client:
        summary = run_segmentation(config, client)
    print(f"segmentation: {summary['segmentation']} ({summary['segments']} segments, "
          f"{summary['fragments']} fragments, {summary['blocks']} blocks)")
    print(json.dumps(summary))
    return 0
