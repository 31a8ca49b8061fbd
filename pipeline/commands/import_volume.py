"""`connectome import SRC DST --voxel-size X Y Z`: HDF5 / image stack / .npy -> zarr3 or precomputed volume."""

from __future__ import annotations

import argparse
import json

HELP = ("Import a volume (SRC = file.h5:dataset, a directory or glob of PNG/TIFF sections, or a .npy file; all ZYX) "
        "into DST (a zarr3 or precomputed URL/path).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="file.h5:dataset | directory or glob of sections | file.npy")
    parser.add_argument("dst", metavar="DST", help="e.g. out.zarr, zarr3://gs://bucket/x, precomputed://file:///data/x")
    parser.add_argument("--voxel-size", type=float, nargs=3, required=True, metavar=("X", "Y", "Z"),
                        help="voxel size in nm")
    parser.add_argument("--offset", type=int, nargs=3, default=(0, 0, 0), metavar=("X", "Y", "Z"),
                        help="voxel offset of the volume (default 0 0 0)")
    parser.add_argument("--box", type=int, nargs=6, default=None, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="import only this box of SRC (voxels, XYZ start then stop); combine with --offset X0 Y0 Z0 "
                             "to keep the source's coordinates")
    parser.add_argument("--chunk", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"),
                        help="chunk shape in voxels (default 64 64 64)")
    parser.add_argument("--shard", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="shard shape in voxels (a multiple of the chunk); default: unsharded")
    parser.add_argument("--kind", choices=("image", "segmentation"), default=None,
                        help="default: segmentation for uint32/uint64 sources, else image")
    parser.add_argument("--dtype", default=None, help="cast to this dtype (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from storage.box import Box
    from storage.importers import import_volume

    vol = import_volume(
        args.src, args.dst, voxel_size_xyz_nm=args.voxel_size, voxel_offset_xyz=args.offset,
        chunk_shape_zyx=tuple(reversed(args.chunk)),
        shard_shape_zyx=tuple(reversed(args.shard)) if args.shard else None,
        kind=args.kind, dtype=args.dtype, delete_existing=args.overwrite,
        crop=Box.from_xyz(args.box[:3], args.box[3:]) if args.box else None,
    )
    shape_xyz = list(reversed(vol.shape))
    print(f"imported {args.src} -> {vol.url}: {shape_xyz[0]}x{shape_xyz[1]}x{shape_xyz[2]} (xyz) {vol.dtype} "
          f"{vol.kind}, voxel size {list(vol.voxel_size)} nm")
    print(json.dumps({"url": vol.url, "shape_xyz": shape_xyz, "dtype": str(vol.dtype), "kind": vol.kind,
                      "voxel_size_nm": list(vol.voxel_size), "voxel_offset": list(vol.voxel_offset)}))
    return 0
