"""Wall time of `connectome demo --no-view` (the product's first impression): target <= 10 minutes on this
2-core machine at the default size (128 x 256 x 256).

Runs the real command in a subprocess (fresh interpreter, its own LocalCluster, a fresh output folder), so the
figure includes imports, cluster start, synthetic data, every stage and the scoring. Reports the wall time, the
demo's own per-stage seconds and quality figures (its last JSON line), and the load average before and after,
since other processes on a shared machine slow it down.

    python benchmarks/demo_time.py [--size 128 256 256] [--workers 2] [--timeout 1800]

Last stdout line: JSON with wall_s, target_s, within_target, size, load_before/after, demo (the demo's summary).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import last_json

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 600.0




def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", nargs=3, type=int, default=(128, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--workdir", default=None, help="where the demo writes (default: a temp dir, removed after)")
    args = p.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="demo-time-"))
    out = work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--no-view", "--out", str(out), "--workers",
           str(args.workers), "--size", *map(str, args.size)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = -1, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), \
            f"timed out after {args.timeout} s"
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    demo = last_json(stdout) if rc == 0 else None
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "wall_s": round(wall, 1), "target_s": TARGET_S, "within_target": bool(rc == 0 and wall <= TARGET_S),
        "returncode": rc, "size": list(args.size), "workers": args.workers,
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
        "cpus": os.cpu_count(), "demo": demo,
    }
    if rc != 0:
        result["error_tail"] = stderr.strip().splitlines()[-5:]
    print(f"connectome demo --no-view {' '.join(map(str, args.size))}: {wall:.0f} s "
          f"(target {TARGET_S:.0f} s, exit {rc}); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(json.dumps(result, default=str))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
