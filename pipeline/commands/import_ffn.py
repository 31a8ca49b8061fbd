"""`connectome import-ffn CHECKPOINT_PREFIX OUT_DIR`: a google/ffn TF1 checkpoint -> our FFN model folder."""

from __future__ import annotations

import argparse
import json

HELP = "Import a google/ffn convstack_3d TF1 checkpoint (prefix, e.g. models/fib25/model.ckpt-27465036) into a model folder."


def _xyz(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_PREFIX", help="checkpoint path without .index/.data-*")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="model folder to write (config.json + weights)")
    parser.add_argument("--fov-size", type=_xyz, default=(33, 33, 33), metavar="X,Y,Z", help="FOV in voxels (default 33,33,33)")
    parser.add_argument("--deltas", type=_xyz, default=(8, 8, 8), metavar="X,Y,Z", help="FOV move step (default 8,8,8)")
    parser.add_argument("--image-mean", type=float, default=128.0)
    parser.add_argument("--image-stddev", type=float, default=33.0)


def run(args: argparse.Namespace) -> int:
    from ffn.checkpoint_import import import_checkpoint
    from ffn.model import load_config

    out = import_checkpoint(
        args.checkpoint,
        args.out_dir,
        fov_size=tuple(args.fov_size[::-1]),
        deltas=tuple(args.deltas[::-1]),
        image_mean=args.image_mean,
        image_stddev=args.image_stddev,
    )
    config = load_config(out)
    print(f"imported {args.checkpoint} -> {out} (depth {config.depth}, features {config.features}, "
          f"{config.num_params():,} parameters)")
    print(json.dumps({"model_dir": str(out), "depth": config.depth, "features": config.features,
                      "params": config.num_params()}))
    return 0
