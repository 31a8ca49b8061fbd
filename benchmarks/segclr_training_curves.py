"""Plot a SegCLR training log (``WORKDIR/train_log.jsonl``): NT-Xent loss, contrastive top-1 and std_x_sqrtd
against the step, smoothed over +-``--window`` steps, and print the table of smoothed values used in TRAINING.md.

    python benchmarks/segclr_training_curves.py /tmp/segclr/work3/train_log.jsonl \
        segclr/models/segclr_synth_small/training_curves.png --every 250
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("png")
    ap.add_argument("--window", type=int, default=50, help="smoothing half-width in steps")
    ap.add_argument("--every", type=int, default=250, help="table row spacing in steps")
    ap.add_argument("--batch", type=int, default=32, help="pairs per batch (for the log(2B-1) chance line)")
    args = ap.parse_args(argv)
    recs = {}
    for line in open(args.log):
        r = json.loads(line)
        recs[r["step"]] = r  # a resumed run may log a step twice: keep the last
    steps = np.array(sorted(recs))
    keys = ("loss", "top1", "std_x_sqrtd")
    vals = {k: np.array([recs[s][k] for s in steps]) for k in keys}

    def smooth(k, s):
        m = np.abs(steps - s) <= args.window
        return float(vals[k][m].mean())

    print("| step | NT-Xent loss | contrastive top-1 | std_x_sqrtd |")
    print("|---|---|---|---|")
    rows = [s for s in range(args.every, int(steps.max()) + 1, args.every)]
    if steps.min() < args.every:
        rows = [int(steps.min())] + rows
    if rows[-1] != int(steps.max()):
        rows.append(int(steps.max()))
    for s in rows:
        print(f"| {s} | {smooth('loss', s):.2f} | {smooth('top1', s):.3f} | {smooth('std_x_sqrtd', s):.2f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, k in zip(axes, keys):
        ax.plot(steps, vals[k], color="0.8", lw=0.8)
        ax.plot(steps, [smooth(k, s) for s in steps], color="C0")
        ax.set_xlabel("step")
        ax.set_title(k)
    axes[0].axhline(np.log(2 * args.batch - 1), color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"plot: {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
