"""`connectome plan`: blocks, GPU/CPU-hours, storage and cost of a run over a volume of a given size."""

from __future__ import annotations

import argparse
import json

HELP = "estimate blocks, GPU/CPU-hours, storage and cost per stage for a volume (petabyte planning)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", nargs=3, type=int, required=True, metavar=("X", "Y", "Z"),
                        help="volume size in voxels of scale 0, x y z (as Neuroglancer shows it)")
    parser.add_argument("--voxel-size", nargs=3, type=float, required=True, metavar=("X", "Y", "Z"), help="nm")
    parser.add_argument("--rates", default=None, help="rates JSON (default: the measured pipeline/rates.json)")
    parser.add_argument("--gpu-hour-price", type=float, default=2.5)
    parser.add_argument("--cpu-hour-price", type=float, default=0.04, help="per core-hour")
    parser.add_argument("--storage-tb-month-price", type=float, default=20.0)


def run(args: argparse.Namespace) -> int:
    from pipeline.plan import format_plan, load_rates, plan

    p = plan(tuple(args.shape), tuple(args.voxel_size), load_rates(args.rates), gpu_hour_price=args.gpu_hour_price,
             cpu_hour_price=args.cpu_hour_price, storage_tb_month_price=args.storage_tb_month_price)
    print(format_plan(p))
    print(json.dumps({k: p[k] for k in ("volume_mm3", "voxels", "gpu_hours", "cpu_hours", "compute_cost",
                                        "storage_bytes", "storage_cost_per_month")}))
    return 0
