"""Query latency of the connectome store: DuckDB and PostgreSQL next to pandas on in-memory DataFrames.

A synthetic connectome (default 10^5 cells, 2*10^6 synapses; ``--synapses 10000000`` for the issue's full size) is
loaded through the store's batch writers into a DuckDB file and a throw-away local PostgreSQL server, then each
backend answers the same queries:

- one-cell synapses: ``synapses(pre=cell)`` for random cells (p50/p95 ms)
- partners: ``partners(cell, direction='out')`` (p50/p95 ms)
- bbox: ``synapses(bbox=20 um cube)`` (p50/p95 ms)
- connectivity matrix: ``connectivity(group_by='cell_type')`` (median s)

pandas does the same with boolean masks / groupby on DataFrames already in memory (segment ids resolved).
Targets (DuckDB): one-cell p50 <= 20 ms, connectivity <= 1 s. The last stdout line is one JSON object:
{"duckdb": {...}, "postgres": {...}, "pandas": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.store import ConnectomeStore  # noqa: E402
from storage.store.synthetic import synthetic_connectome  # noqa: E402

EXTENT_NM = 1_000_000
BOX_NM = 50_000


def timed(fn, reps: int, cpu: list | None = None) -> list[float]:
    """Wall seconds per call; with ``cpu``, also appends this process's CPU seconds per call (DuckDB and pandas
    run in-process, so CPU time shows their cost even when a shared machine stretches the wall time)."""
    out = []
    for i in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn(i)
        out.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return out


def stats(one_cell, partners, bbox, conn) -> dict:
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 2)  # noqa: E731
    return {
        "one_cell_synapses_p50_ms": ms(one_cell, 50), "one_cell_synapses_p95_ms": ms(one_cell, 95),
        "partners_p50_ms": ms(partners, 50), "partners_p95_ms": ms(partners, 95),
        "bbox_p50_ms": ms(bbox, 50), "bbox_p95_ms": ms(bbox, 95),
        "connectivity_matrix_s": round(float(np.median(conn)), 3),
    }


def load(store: ConnectomeStore, tables: dict, batch: int) -> float:
    t = time.perf_counter()
    with store.loading("benchmark") as v:
        store.write_segments(tables["segments"], version=v)
        store.write_cell_types(tables["cell_types"], version=v)
        syn = tables["synapses"]
        for start in range(0, syn.num_rows, batch):
            store.write_synapses(syn.slice(start, batch), version=v)
    return time.perf_counter() - t


def cpu_stats(one_cpu, conn_cpu) -> dict:
    return {"one_cell_synapses_cpu_p50_ms": round(float(np.median(one_cpu)) * 1000, 2),
            "connectivity_matrix_cpu_s": round(float(np.median(conn_cpu)), 3)}


def run_store(store, cells: np.ndarray, boxes, reps: int, conn_reps: int) -> dict:
    store.synapses(pre=int(cells[0]))  # warm caches once
    one_cpu, conn_cpu = [], []
    one = timed(lambda i: store.synapses(pre=int(cells[i])), reps, one_cpu)
    par = timed(lambda i: store.partners(int(cells[-1 - i]), direction="out"), reps)
    box = timed(lambda i: store.synapses(bbox=boxes[i % len(boxes)]), max(5, reps // 2))
    con = timed(lambda i: store.connectivity(group_by="cell_type"), conn_reps, conn_cpu)
    out = stats(one, par, box, con)
    if store.backend.dialect == "duckdb":  # PostgreSQL works in its server processes: no client CPU figure
        out.update(cpu_stats(one_cpu, conn_cpu))
    return out


def run_pandas(tables: dict, cells: np.ndarray, boxes, reps: int, conn_reps: int) -> dict:
    syn = tables["synapses"].to_pandas()
    syn = syn.rename(columns={"pre_fragment_id": "pre_segment_id", "post_fragment_id": "post_segment_id"})
    types = tables["cell_types"].to_pandas().set_index("segment_id")["cell_type"]

    def one_cell(i):
        c = int(cells[i])
        s = syn[(syn.pre_segment_id == c) & syn.valid & (syn.post_segment_id != c)]
        return s.assign(post_cell_type=s.post_segment_id.map(types))

    def partners(i):
        c = int(cells[-1 - i])
        s = syn[(syn.pre_segment_id == c) & syn.valid & (syn.post_segment_id != c)]
        return s.groupby("post_segment_id").size().sort_values(ascending=False)

    def bbox(i):
        lo, hi = boxes[i % len(boxes)]
        m = syn.valid.to_numpy().copy()
        for a, l, h in zip("xyz", lo, hi):
            col = syn[f"{a}_nm"].to_numpy()
            m &= (col >= l) & (col < h)
        return syn[m]

    def conn(i):
        s = syn[syn.valid & (syn.pre_segment_id != syn.post_segment_id)]
        pre = s.pre_segment_id.map(types).fillna("untyped")
        post = s.post_segment_id.map(types).fillna("untyped")
        return pd.crosstab(pre, post)

    one_cpu, conn_cpu = [], []
    out = stats(timed(one_cell, reps, one_cpu), timed(partners, reps), timed(bbox, max(5, reps // 2)),
                timed(conn, conn_reps, conn_cpu))
    return {**out, **cpu_stats(one_cpu, conn_cpu)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--synapses", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=1_000_000, help="rows per write_synapses batch")
    p.add_argument("--reps", type=int, default=40, help="queries per latency figure")
    p.add_argument("--conn-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    p.add_argument("--postgres-url", help="use this server instead of starting a throw-away one")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--workdir", help="where the DuckDB file goes (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    tables = synthetic_connectome(args.cells, args.synapses, fragments_per_segment=0, seed=0, extent_nm=EXTENT_NM,
                                  points=False)
    tables.pop("skeleton_nodes")
    print(f"generated {args.cells} cells, {args.synapses} synapses in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    counts = np.bincount(tables["synapses"]["pre_segment_id"].to_numpy(), minlength=args.cells + 1)
    cells = rng.choice(np.nonzero(counts)[0], args.reps)
    boxes = []
    for _ in range(8):
        lo = rng.integers(100_000, EXTENT_NM - 100_000 - BOX_NM, 3)
        boxes.append((tuple(int(v) for v in lo), tuple(int(v + BOX_NM) for v in lo)))
    result: dict = {"n_cells": args.cells, "n_synapses": args.synapses,
                    "cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(os.getloadavg()[0], 1)}

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="query-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = ConnectomeStore.create(work / "bench.duckdb", threads=args.threads)
        load_s = load(store, tables, args.batch)
        print(f"duckdb: loaded in {load_s:.1f} s", flush=True)
        result["duckdb"] = {**run_store(store, cells, boxes, args.reps, args.conn_reps), "load_s": round(load_s, 1)}
        print("duckdb", result["duckdb"], flush=True)
        result["mean_synapses_per_one_cell_query"] = round(args.synapses / max(1, len(np.nonzero(counts)[0])), 1)
        result["bbox_rows"] = int(len(store.synapses(bbox=boxes[0])))
        store.close()

        if not args.no_postgres:
            server = None
            try:
                url = args.postgres_url
                if url is None:
                    from storage.store.local_postgres import PostgresServer

                    server = PostgresServer("-c shared_buffers=1GB -c work_mem=256MB -c maintenance_work_mem=512MB "
                                            "-c max_wal_size=4GB").start()
                    url = server.new_database()
                store = ConnectomeStore.create(url)
                load_s = load(store, tables, args.batch)
                print(f"postgres: loaded in {load_s:.1f} s", flush=True)
                result["postgres"] = {**run_store(store, cells, boxes, args.reps, args.conn_reps),
                                      "load_s": round(load_s, 1)}
                print("postgres", result["postgres"], flush=True)
                store.close()
            finally:
                if server is not None:
                    server.stop()

        result["pandas"] = run_pandas(tables, cells, boxes, args.reps, args.conn_reps)
        print("pandas", result["pandas"], flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 1)  # latencies are only comparable on a quiet machine
    d = result["duckdb"]
    result["targets_met"] = {"duckdb_one_cell_p50_le_20ms": d["one_cell_synapses_p50_ms"] <= 20,
                             "duckdb_connectivity_le_1s": d["connectivity_matrix_s"] <= 1.0}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
