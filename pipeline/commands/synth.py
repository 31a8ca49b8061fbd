"""`connectome synth DST --shape Z Y X --voxel-size X Y Z --seed N`: synthetic EM with ground truth, on Dask.

A DST ending in .h5 is written in this process instead, without Dask or TensorStore: one HDF5 file of training
size (raw, gt, compartments, clefts datasets), which the FFN trainer reads as `DST.h5:raw` / `DST.h5:gt`. That is
what a GPU training node whose stack lacks Dask needs."""

from __future__ import annotations

import argparse
import json
import time

HELP = "generate synthetic EM neuropil with ground truth (raw, gt, compartments, clefts, synapse/cell-type tables)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", metavar="DST", help="output directory (DST/raw, DST/gt, ... as zarr3; tables as "
                        "parquet), or a file.h5 (raw, gt, compartments, clefts datasets; made in this process without Dask, so "
                        "--workers, --address, --block-shape and --restart do not apply)")
    parser.add_argument("--shape", nargs=3, type=int, default=(128, 256, 256), metavar=("Z", "Y", "X"),
                        help="volume shape in voxels, Z Y X (default 128 256 256)")
    parser.add_argument("--voxel-size", nargs=3, type=float, default=(8.0, 8.0, 40.0), metavar=("X", "Y", "Z"),
                        help="voxel size in nm, X Y Z (default 8 8 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--params", default=None, help="JSON file with more SynthParams fields (densities, look)")
    parser.add_argument("--block-shape", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--address", default=None, help="use a running Dask scheduler instead of a LocalCluster")
    parser.add_argument("--restart", action="store_true", help="ignore a previous partial run in DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.synthetic import SynthParams
    from storage.errors import ConnectomeError

    extra = {}
    if args.params:
        path = Path(args.params)
        if not path.is_file():
            raise ConnectomeError(f"--params file {path} does not exist")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConnectomeError(f"--params file {path} is not JSON: {exc}") from None
    extra.update({"seed": args.seed, "shape_zyx": list(args.shape), "voxel_size_xyz_nm": list(args.voxel_size)})
    params = SynthParams.from_json(extra)
    if str(args.dst).lower().endswith((".h5", ".hdf5")):
        return _write_h5(Path(args.dst), params)
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.synthetic.write import write_synthetic

    cluster = ClusterConfig(kind="address", address=args.address) if args.address else ClusterConfig(
        workers=args.workers, threads_per_worker=1, dashboard=False)
    t0 = time.perf_counter()
    with open_client(cluster) as client:
        summary = write_synthetic(args.dst, params, client=client, block_shape=args.block_shape,
                                  restart=args.restart, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    voxels = int(params.shape_zyx[0] * params.shape_zyx[1] * params.shape_zyx[2])
    print(f"synthetic volume {args.dst}: {voxels:,} voxels, {summary['segments']} segments, "
          f"{summary['synapses']} synapses in {seconds:.1f} s")
    print(json.dumps({"dst": str(args.dst), "voxels": voxels, "seconds": round(seconds, 2),
                      "segments": summary["segments"], "synapses": summary["synapses"],
                      "cell_type_counts": summary["cell_type_counts"]}))
    return 0


def _write_h5(dst, params) -> int:
    """The whole volume in memory, written under a temporary name and renamed: no half-written file looks done."""
    import h5py
    import numpy as np

    from pipeline.synthetic import generate_box

    t0 = time.perf_counter()
    shape = tuple(int(n) for n in params.shape_zyx)
    volumes = generate_box(params, ((0, 0, 0), shape))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name in ("raw", "gt", "compartments", "clefts"):
                f.create_dataset(name, data=volumes[name], compression="gzip", compression_opts=1)
            f.attrs["voxel_size_xyz_nm"] = list(params.voxel_size_xyz_nm)
            f.attrs["seed"] = int(params.seed)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    segments = int(np.count_nonzero(np.unique(volumes["gt"])))
    synapses = int(np.count_nonzero(np.unique(volumes["clefts"])))
    print(f"synthetic volume {dst}: {int(np.prod(shape)):,} voxels, {segments} segments, {synapses} synapses in "
          f"{seconds:.1f} s")
    print(json.dumps({"dst": str(dst), "voxels": int(np.prod(shape)), "seconds": round(seconds, 2),
                      "segments": segments, "synapses": synapses}))
    return 0
