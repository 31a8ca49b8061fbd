"""`connectome info URL`: what a volume is (shape, dtype, voxel size, chunking, scales), as a person reads it (XYZ)."""

from __future__ import annotations

import argparse
import json

HELP = ("Print shape, dtype, voxel size, chunking and scales of a volume (zarr, zarr3, n5, precomputed; any URL); "
        "for file.h5:dataset, .npy or .tif, its shape and dtype.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="volume URL or path, e.g. precomputed://gs://bucket/x or out.zarr")
    parser.add_argument("--scale", type=int, default=0, help="pyramid level (default 0)")


def info_dict(vol) -> dict:
    """Everything `info` prints, XYZ order."""
    return {
        "url": vol.url,
        "format": vol.format,
        "kind": vol.kind,
        "scale": vol.scale,
        "shape_xyz": list(reversed(vol.shape)),
        "dtype": str(vol.dtype),
        "voxel_size_nm": list(vol.voxel_size),
        "voxel_offset": list(vol.voxel_offset),
        "chunk_xyz": list(reversed(vol.read_chunk_shape)),
        "write_chunk_xyz": list(reversed(vol.chunk_shape)),
        "sharded": vol.sharded,
        "scales_voxel_size_nm": [list(v) for v in vol.scale_voxel_sizes()],
    }


def array_file_info(src: str) -> dict:
    """Shape and dtype of an array file (`connectome import` turns it into a chunked volume); it carries no voxel
    size or chunking the pipeline would use."""
    from storage.importers import open_source

    source = open_source(src)
    source.close()
    return {"url": source.name, "format": "array file", "shape_xyz": list(reversed(source.shape)),
            "dtype": str(source.dtype)}


def run(args: argparse.Namespace) -> int:
    from storage.importers import is_array_file
    from storage.volume import open_volume

    if is_array_file(args.url):
        d = array_file_info(args.url)
        print(f"url:          {d['url']}")
        print(f"shape:        {' x '.join(map(str, d['shape_xyz']))} voxels (xyz)")
        print(f"dtype:        {d['dtype']}")
        print("an array file: `connectome import SRC DST --voxel-size X Y Z` writes it as a chunked volume")
        print(json.dumps(d))
        return 0
    d = info_dict(open_volume(args.url, scale=args.scale))
    fmt = lambda v: " x ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)  # noqa: E731
    print(f"url:          {d['url']}")
    print(f"format:       {d['format']} ({d['kind']}), scale {d['scale']} of {len(d['scales_voxel_size_nm'])}")
    print(f"shape:        {fmt(d['shape_xyz'])} voxels (xyz)")
    print(f"dtype:        {d['dtype']}")
    print(f"voxel size:   {fmt(d['voxel_size_nm'])} nm (xyz)")
    print(f"voxel offset: {fmt(d['voxel_offset'])} (xyz)")
    chunking = fmt(d["chunk_xyz"]) + (f", shards {fmt(d['write_chunk_xyz'])}" if d["sharded"] else "")
    print(f"chunks:       {chunking} (xyz)")
    print(json.dumps(d))
    return 0
