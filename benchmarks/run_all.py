"""Run every benchmark at a CI-sized scale and write benchmarks/REPORT.md with the figures and plots.

Each benchmark runs as its own subprocess (fresh interpreter, its own cluster) with small-size flags; its last
stdout line is one JSON object with its figures. A benchmark that fails, times out or prints no JSON is recorded
as such and the rest still run. Results go to benchmarks/results.json (raw) and benchmarks/REPORT.md (tables,
headline ratios, PNG plots in benchmarks/report/).

    python benchmarks/run_all.py                     # all benchmarks, CI sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --only query_speed mesh_downsample_vs_igneous
    python benchmarks/run_all.py --report-only       # rebuild REPORT.md from results.json

Headline comparisons (side by side in the same run, same machine):
- meshing and downsampling against igneous on the same segmentation (mesh_downsample_vs_igneous);
- FFN inference against the reference figures measured with google/ffn on this machine (notes/ffn.md:
  105.7 ms/step, 6,894 voxels/s; ffn_speed);
- store queries (DuckDB, PostgreSQL) against pandas on in-memory DataFrames (query_speed);
- the demo's wall time against its 10-minute target (demo_time).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import last_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results.json"
REPORT = HERE / "REPORT.md"
PLOTS = HERE / "report"
FFN_REFERENCE = {"ms_per_step": 105.7, "voxels_per_s": 6894.0}  # google/ffn, FIB-25 model, this 2-core CPU

# name -> (arguments at CI scale, timeout seconds). Order: cheap and independent first.
BENCHMARKS: dict[str, tuple[list[str], int]] = {
    # the side-by-side comparisons first, then throughput/scaling, then the (slow) quality benchmarks
    "query_speed": (["--cells", "5000", "--synapses", "200000", "--batch", "100000", "--reps", "20",
                     "--conn-reps", "2", "--threads", "2"], 900),
    "mesh_downsample_vs_igneous": (["--shape", "64", "128", "128"], 900),
    "tensorflow_backend": (["--repeats", "10"], 900),
    # 96^3: the smallest size where the FIB-25 model takes enough steps for a steady ms/step (48^3: 9 steps)
    "ffn_speed": (["--size", "96", "--batches", "1,4", "--fib25-batches", "1", "--precisions", "float32",
                   "--threads", "2"], 1500),
    "demo_time": ([], 2400),  # the default demo size: the 10-minute target is for it
    "segment_scaling": (["--size", "64"], 1500),
    "io_throughput": (["--size-mb", "64", "--shard", "128", "--chunk", "64", "--rounds", "2"], 600),
    "blockwise_overhead": (["--blocks", "300", "--repeats", "2"], 600),
    "scheduler_scale": (["--blocks", "3000", "--ledger-blocks", "100000"], 900),
    "synthetic_rate": (["--shape", "32", "128", "128"], 600),
    "synapse_quality": (["--seeds", "201", "--shape", "32", "96", "96"], 1200),
    "ffn_quality": (["--xy", "64", "--synthetic-shape", "32,64,64", "--threads", "2"], 1800),
    "segment_quality": (["--xy", "64", "--seeds", "11"], 1800),
    "segclr_quality": (["--seeds", "101,102", "--shape-xyz", "192,192,48", "--draws", "3"], 1800),
}
NOT_BENCHMARKS = {"run_all", "segclr_data", "common"}  # segclr_data generates training volumes; it measures nothing




def run_one(name: str, args: list[str], timeout: int) -> dict:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = f"timed out after {timeout} s"
    record = {"name": name, "args": args, "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
              "load_before": round(load, 1), "result": last_json(out) if rc == 0 else None}
    if rc != 0 or record["result"] is None:
        tail = [line for line in (err or out).strip().splitlines() if line.strip()][-6:]
        record["error"] = tail
    return record


def discover() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    ordered = [n for n in BENCHMARKS if n in found]
    return ordered + [n for n in found if n not in BENCHMARKS]  # a new script runs with its defaults


# ------------------------------------------------------------------------------------------- report

def flatten(value, prefix: str = "") -> dict:
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) and len(value) <= 6:
        out[prefix] = ", ".join(_fmt(v) for v in value)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)[:80]
    else:
        out[prefix] = value
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _get(d: dict | None, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def plot_all(results: dict[str, dict]) -> dict[str, str]:
    """PNG plots; returns {title: relative path}. A plot whose data is missing is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    PLOTS.mkdir(exist_ok=True)
    made: dict[str, str] = {}

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(PLOTS / name, dpi=110)
        plt.close(fig)
        made[title] = f"report/{name}"

    demo = _get(results.get("demo_time"), "result", "demo")
    seconds = _get(demo, "seconds") or {}
    size = _get(results.get("demo_time"), "result", "size")
    if seconds and size:
        voxels = size[0] * size[1] * size[2]
        stages = [s for s, v in seconds.items() if isinstance(v, (int, float)) and v > 0]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(stages, [voxels / seconds[s] / 1e3 for s in stages], color="tab:blue")
        ax.set_ylabel("k voxels / s")
        ax.set_title(f"Per-stage throughput, demo {size[0]}x{size[1]}x{size[2]} (zyx), 2 workers")
        ax.tick_params(axis="x", rotation=30)
        save(fig, "stage_throughput.png", "Per-stage throughput (demo)")

    sc = _get(results.get("segment_scaling"), "result")
    if sc and _get(sc, "stage_seconds_1_worker"):
        one, two = sc["stage_seconds_1_worker"], sc["stage_seconds_2_workers"]
        stages = list(two)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = range(len(stages))
        ax.bar([i - 0.2 for i in x], [one.get(s, 0) for s in stages], 0.4, label="1 worker")
        ax.bar([i + 0.2 for i in x], [two.get(s, 0) for s in stages], 0.4, label="2 workers")
        ax.set_xticks(list(x), stages, rotation=30)
        ax.set_ylabel("seconds")
        ax.set_title(f"Segmentation 1 -> 2 workers: speed-up {sc.get('speedup')} (segment {sc.get('segment_speedup')})")
        ax.legend()
        save(fig, "worker_scaling.png", "1 -> 2 worker scaling (segmentation)")

    q = _get(results.get("query_speed"), "result")
    if q:
        backends = [b for b in ("duckdb", "postgres", "pandas") if isinstance(q.get(b), dict)]
        keys = sorted({k for b in backends for k in q[b] if k.endswith("_p50_ms")})
        if keys:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            width = 0.8 / len(backends)
            for j, b in enumerate(backends):
                ax.bar([i + j * width for i in range(len(keys))], [q[b].get(k, 0) or 0 for k in keys], width, label=b)
            ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(keys))],
                          [k.replace("_p50_ms", "") for k in keys], rotation=20)
            ax.set_ylabel("p50 latency, ms (log)")
            ax.set_yscale("log")
            ax.set_title("Query latency: store backends vs pandas in memory")
            ax.legend()
            save(fig, "query_latency.png", "Query latency")

    m = _get(results.get("mesh_downsample_vs_igneous"), "result")
    if m and _get(m, "mesh", "igneous_s") is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels = ["mesh", "downsample"]
        ours = [m["mesh"]["ours_s"], m["downsample"]["ours_s"]]
        theirs = [m["mesh"]["igneous_s"], m["downsample"].get("igneous_s", 0)]
        ax.bar([0 - 0.2, 1 - 0.2], ours, 0.4, label="ours")
        ax.bar([0 + 0.2, 1 + 0.2], theirs, 0.4, label="igneous")
        ax.set_xticks([0, 1], labels)
        ax.set_ylabel("seconds")
        ax.set_title("Meshing and downsampling vs igneous")
        ax.legend()
        save(fig, "igneous.png", "Meshing and downsampling vs igneous")
    return made


def headline(results: dict[str, dict]) -> list[str]:
    rows = []
    m = _get(results.get("mesh_downsample_vs_igneous"), "result")
    if m:
        if _get(m, "mesh", "speed_ratio") is not None:
            mm, dd = m["mesh"], m["downsample"]
            rows.append(f"| meshing vs igneous | {mm['ours_s']:.2f} s vs {mm['igneous_s']:.2f} s | "
                        f"**{mm['speed_ratio']:.3g}x** (igneous time / ours) | vertices {mm['vertices_ours']} vs "
                        f"{mm['vertices_igneous']}, faces {mm['faces_ours']} vs {mm['faces_igneous']}, surface area "
                        f"ratio {mm['area_ratio_total']} (median per-segment difference {mm['area_rel_diff_median']}) |")
            rows.append(f"| downsampling 2x2x1 vs igneous | {dd['ours_s']:.3f} s vs {dd['igneous_s']:.3f} s | "
                        f"**{dd['speed_ratio']:.3g}x** | equal voxels {dd['equal_fraction']} (mode ties broken "
                        f"differently) |")
        else:
            rows.append(f"| meshing/downsampling vs igneous | ours mesh {m['mesh']['ours_s']:.2f} s, downsample "
                        f"{m['downsample']['ours_s']:.3f} s | n/a | igneous: {m.get('igneous')} |")
    f = _get(results.get("ffn_speed"), "result")
    if f:
        ms, vps = f.get("ms_per_step"), f.get("voxels_per_s")  # top level = the FIB-25 model, float32, batch 1
        if isinstance(ms, (int, float)) or isinstance(vps, (int, float)):
            parts, ratio = [], []
            if isinstance(ms, (int, float)):
                parts.append(f"{ms:.1f} ms/step")
                ratio.append(f"{FFN_REFERENCE['ms_per_step'] / ms:.3g}x per step")
            if isinstance(vps, (int, float)):
                parts.append(f"{vps:,.0f} voxels/s")
                ratio.append(f"{vps / FFN_REFERENCE['voxels_per_s']:.3g}x voxels/s")
            steps = f.get("steps")
            rows.append(f"| FFN inference (FIB-25 model) vs google/ffn reference | {', '.join(parts)} vs 105.7 "
                        f"ms/step, 6,894 voxels/s | **{'; '.join(ratio)}** (> 1: ours faster) | reference: google/ffn "
                        f"on this machine, synthetic 160^3 (notes/ffn.md); this run: {f.get('volume')} "
                        f"{f.get('size')}^3, {steps} steps" + (" (too few steps for a steady ms/step: first-call "
                        "warm-up dominates)" if isinstance(steps, int) and steps < 50 else "") + " |")
    t = _get(results.get("tensorflow_backend"), "result")
    if t and isinstance(t.get("speedup"), dict):
        names = {"ffn_small_forward_b4_ms": "small FFN forward (batch 4)", "ffn_small_train_step_b4_ms":
                 "small FFN training step", "fib25_forward_b1_ms": "FIB-25 forward", "synapse_unet_block_ms":
                 "synapse U-Net, one 48x192x192 block"}
        for key, ratio in t["speedup"].items():
            rows.append(f"| TensorFlow oneDNN vs Eigen kernels: {names.get(key, key)} | {t['onednn'][key]:.4g} ms vs "
                        f"{t['eigen'][key]:.4g} ms | **{ratio:.3g}x** (Eigen time / oneDNN) | oneDNN is what the "
                        "project turns on (storage/tensorflow_env.py); Eigen is TensorFlow's default on AVX2 CPUs |")
    q = _get(results.get("query_speed"), "result")
    if q and isinstance(q.get("duckdb"), dict) and isinstance(q.get("pandas"), dict):
        for key in sorted(k for k in q["duckdb"] if k.endswith("_p50_ms") or k.endswith("_s")):
            d, p = q["duckdb"].get(key), q["pandas"].get(key)
            pg = q.get("postgres", {}).get(key) if isinstance(q.get("postgres"), dict) else None
            if isinstance(d, (int, float)) and isinstance(p, (int, float)) and d > 0:
                unit = "ms" if key.endswith("_ms") else "s"
                rows.append(f"| query {key} | DuckDB {d:.4g} {unit}"
                            + (f", PostgreSQL {pg:.4g} {unit}" if isinstance(pg, (int, float)) else "")
                            + f" vs pandas {p:.4g} {unit} | **{p / d:.3g}x** (pandas time / DuckDB time; "
                            "> 1: the store is faster) | pandas answers from DataFrames already in memory |")
    d = _get(results.get("demo_time"), "result")
    if d:
        rows.append(f"| `connectome demo --no-view` {'x'.join(map(str, d.get('size', [])))} | {d['wall_s']:.0f} s "
                    f"| target {d['target_s']:.0f} s: **{'met' if d['within_target'] else 'NOT met'}** | load "
                    f"average {d['load_before'][0]} -> {d['load_after'][0]} on {d.get('cpus')} CPUs |")
    return rows


def write_report(results: dict[str, dict], meta: dict) -> None:
    plots = plot_all(results)
    lines = [
        "# Benchmark report",
        "",
        f"Generated by `python benchmarks/run_all.py` on {meta['date']} ({meta['machine']}, {meta['cpus']} CPUs); "
        "each benchmark's own run date is in the Status table (`--only` reruns some and keeps the others). "
        "Every benchmark ran at a CI-sized scale (the arguments are listed per benchmark); the issue-sized runs are "
        "each script's defaults. The machine was shared with other jobs while this ran: the load average before "
        "each benchmark is listed, and wall times on a loaded 2-core machine are upper bounds.",
        "",
        "## Headline ratios (side by side in the same run)",
        "",
        "| comparison | figures | ratio | output / notes |",
        "|---|---|---|---|",
        *(headline(results) or ["| (no comparison finished) | | | |"]),
        "",
    ]
    m = _get(results.get("mesh_downsample_vs_igneous"), "result")
    if m:
        lines += [f"igneous: {m.get('igneous')} (installed into the benchmark environment at run time with `pip install "
                  "igneous-pipeline`; not a project dependency).", ""]
    if plots:
        lines += ["## Plots", ""]
        for title, rel in plots.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Status", "", "| benchmark | ran | status | seconds | load before | arguments |",
              "|---|---|---|---|---|---|"]
    for name, rec in results.items():
        ok = rec["returncode"] == 0 and rec.get("result") is not None
        status = "ok" if ok else f"FAILED ({rec['returncode']})"
        lines.append(f"| {name} | {rec.get('date', '?')} | {status} | {rec['seconds']} | {rec.get('load_before')} | "
                     f"`{' '.join(rec['args']) or '(defaults)'}` |")
    lines += ["", "## Figures per benchmark", ""]
    for name, rec in results.items():
        lines += [f"### {name}", ""]
        if rec.get("result") is None:
            lines += ["Did not produce figures. Last lines of its output:", "", "```",
                      *(rec.get("error") or ["(none)"]), "```", ""]
            continue
        lines += ["| figure | value |", "|---|---|"]
        for key, value in flatten(rec["result"]).items():
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    REPORT.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="run only these benchmarks (names without .py)")
    p.add_argument("--skip", nargs="*", default=[], help="leave these out")
    p.add_argument("--report-only", action="store_true", help="rebuild REPORT.md from benchmarks/results.json")
    args = p.parse_args()

    results: dict[str, dict] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    meta = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
            "cpus": os.cpu_count()}
    if not args.report_only:
        names = [n for n in discover() if (args.only is None or n in args.only) and n not in args.skip]
        for name in names:
            bench_args, timeout = BENCHMARKS.get(name, ([], 1800))
            print(f"[run_all] {name} {' '.join(bench_args)}", flush=True)
            rec = run_one(name, bench_args, timeout)
            results[name] = rec
            status = "ok" if rec["result"] is not None else f"failed: {(rec.get('error') or ['?'])[-1]}"
            print(f"[run_all] {name}: {status} ({rec['seconds']} s)", flush=True)
            RESULTS.write_text(json.dumps(results, indent=1, default=str))  # after each: a crash keeps the rest
            write_report(results, meta)
    write_report(results, meta)
    failed = [n for n, r in results.items() if r.get("result") is None]
    print(json.dumps({"report": str(REPORT), "benchmarks": len(results), "failed": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
