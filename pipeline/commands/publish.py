"""`connectome publish RUN`: write the run's Neuroglancer layers from its volumes and the connectome store."""

from __future__ import annotations

import argparse
import json
import os

HELP = ("Publish a run for Neuroglancer at a store version: EM pyramid, segmentation (fragments relabelled through "
        "the store's id map), meshes, skeletons, segment properties, synapse annotations (see viz/publish.py).")


def _xyz(kind):
    def parse(text: str):
        parts = [kind(v) for v in text.split(",")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
        return tuple(parts)
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (or gs://, s3:// URL) to publish into")
    parser.add_argument("--image", default=None, help="EM volume URL (default: keep RUN/raw as it is)")
    parser.add_argument("--fragments", default=None,
                        help="pre-agglomeration fragments volume (default RUN/fragments when it exists)")
    parser.add_argument("--segmentation", default=None,
                        help="segmentation volume to publish as is (instead of relabelling fragments)")
    parser.add_argument("--store", default=None, help="connectome store (default RUN/connectome.duckdb)")
    parser.add_argument("--version", type=int, default=None, help="store version (default: latest)")
    parser.add_argument("--voxel-size", type=_xyz(float), default=None, metavar="X,Y,Z", help="nm, if no volume says")
    parser.add_argument("--chunk", type=_xyz(int), default=(64, 64, 64), metavar="X,Y,Z", help="chunk size (voxels)")
    parser.add_argument("--sharded", action="store_true", default=None, help="shard volumes (default: above 512^3)")
    parser.add_argument("--jpeg", action="store_true", help="encode the EM pyramid as JPEG (uint8; lossy, smaller)")
    parser.add_argument("--jpeg-quality", type=int, default=None, metavar="Q", help="with --jpeg: 1-100 (default 75)")


def _same(a: str, b: str) -> bool:
    from viz.kvstore import kvstore_url

    return kvstore_url(a) == kvstore_url(b)


def run(args: argparse.Namespace) -> int:
    from storage import Connectome
    from storage.errors import ConnectomeError
    from storage.volume import open_volume
    from viz.kvstore import join
    from viz.publish import FRAGMENTS, RAW, STORE, PublishOptions, publish_from_store

    store = args.store or os.path.join(args.run, STORE)
    if not (store.startswith("postgresql://") or os.path.exists(store)):
        raise ConnectomeError(f"no connectome store at {store} (give --store)")
    fragments_url = args.fragments
    if fragments_url is None and args.segmentation is None and os.path.exists(os.path.join(args.run, FRAGMENTS, "info")):
        fragments_url = os.path.join(args.run, FRAGMENTS)
    image = None
    if args.image and not _same(args.image, join(args.run, RAW)):
        image = open_volume(args.image)
    fragments = open_volume(fragments_url) if fragments_url else None
    segmentation = open_volume(args.segmentation) if args.segmentation else None
    with Connectome.open(store, read_only=True) as connectome:
        report = publish_from_store(
            args.run, connectome, image=image, fragments=fragments, segmentation=segmentation,
            voxel_size_xyz_nm=args.voxel_size, version=args.version,
            options=PublishOptions(chunk_size_xyz=args.chunk, sharded=args.sharded,
                                   image_encoding="jpeg" if args.jpeg else "raw", jpeg_quality=args.jpeg_quality),
            write_fragments=fragments_url is not None and not _same(fragments_url, join(args.run, FRAGMENTS)),
        )
    for name, layer in report["layers"].items():
        size = f"{layer['bytes'] / 1e6:.2f} MB" if layer.get("bytes") is not None else "remote"
        print(f"{name:20s} {layer['seconds']:8.2f} s  {size}")
    print(json.dumps(report))
    return 0
