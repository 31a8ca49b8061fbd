"""`connectome evaluate SEG GT`: VOI split/merge, adapted Rand error, split/merge counts (and ERL) of a segmentation."""

from __future__ import annotations

import argparse
import json

HELP = "score a segmentation against ground truth: VOI split/merge (bits), ARAND, split/merge counts, optional ERL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("seg", metavar="SEG", help="segmentation: volume URL/path, file.h5:dataset, .npy or .tif (ZYX)")
    parser.add_argument("gt", metavar="GT", help="ground truth, same forms; id 0 is ignored")
    parser.add_argument("--box", nargs=6, type=int, default=None, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="evaluate only this box (voxels, XYZ start then stop)")
    parser.add_argument("--erl", action="store_true", help="also expected run length on ground-truth skeletons")
    parser.add_argument("--voxel-size", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                        help="nm per voxel for ERL (default: from the GT volume's metadata, else 1 1 1)")
    parser.add_argument("--min-overlap", type=int, default=1, help="voxels an overlap needs to count as split/merge")


def read_labels(src: str, box=None):
    """A ZYX array and its voxel size (XYZ nm or None) from a volume URL/path, file.h5:dataset, .npy or .tif."""
    from storage.importers import is_array_file, open_source

    if is_array_file(src):
        source = open_source(src)
        try:
            arr = source.read_slab(0, source.shape[0])
        finally:
            source.close()
        return (arr if box is None else arr[box.slices]), None
    from storage.volume import open_volume

    vol = open_volume(src)
    return vol.read(box if box is not None else vol.bounds), tuple(vol.voxel_size)


def run(args: argparse.Namespace) -> int:
    from pipeline.metrics import evaluate
    from storage.box import Box
    from storage.errors import ConnectomeError

    box = Box.from_xyz(args.box[:3], args.box[3:]) if args.box else None
    seg, _ = read_labels(args.seg, box)
    gt, gt_vs = read_labels(args.gt, box)
    if seg.shape != gt.shape:
        raise ConnectomeError(f"segmentation {args.seg} has shape {tuple(seg.shape[::-1])} (xyz) but ground truth "
                              f"{args.gt} has {tuple(gt.shape[::-1])} (xyz)")
    vs = tuple(args.voxel_size) if args.voxel_size else (gt_vs or (1.0, 1.0, 1.0))
    scores = evaluate(seg, gt, min_overlap=args.min_overlap, voxel_size_xyz_nm=vs, erl=args.erl)
    print(f"VOI split {scores.voi_split:.4f}  merge {scores.voi_merge:.4f}  total {scores.voi:.4f} (bits)")
    print(f"ARAND {scores.arand:.4f}  (precision {scores.precision:.4f}, recall {scores.recall:.4f})")
    print(f"segments {scores.segments} vs ground truth {scores.gt_segments}; splits {scores.splits}, "
          f"merges {scores.merges}")
    if scores.erl_nm is not None:
        print(f"ERL {scores.erl_nm:.0f} nm (ground truth itself: {scores.gt_erl_nm:.0f} nm)")
    print(json.dumps(scores.to_json()))
    return 0
