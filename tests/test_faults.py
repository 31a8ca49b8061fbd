"""Faults during a run: a Dask worker killed mid-stage, the driver killed and the run resumed, a PostgreSQL
connection dropped mid-load, a run interrupted between stages. Each must finish with outputs identical to an
undisturbed run (segmentation, fragments, pyramid, synapse and skeleton tables, store rows) and nothing lost from,
or duplicated in, the store.

The pipeline parts are small (a 16x64x64 synthetic volume cut into 2 blocks) so the module runs in about two
minutes on two cores. The FFN is a tiny hand-set flood-filling model (it grows through bright voxels, see
tests/test_ffn_inference.py) rather than the packaged one: the faults are about the machinery (ledgers, run
state, store versions), and the packaged model's FOV does not fit a 16-voxel-deep test volume.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cluster import ClusterConfig, open_client
from pipeline.config import dump_config
from pipeline.run import RunConfig, run_pipeline
from storage.box import Box
from storage.errors import ConnectomeError
from storage.volume import create_volume, open_volume

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 64, 64)
BLOCK = (16, 64, 32)  # two blocks along x
OVERLAP = (4, 8, 8)
STAGES = ["segment", "synapses", "skeletonize"]
DATA_TABLES = ("segments", "id_map", "synapses", "skeleton_nodes", "cell_types", "embeddings")


# ------------------------------------------------------------------------------------------- shared helpers

def tiny_ffn_model(directory: Path) -> str:
    """A deterministic flood-filling model that finds objects in synthetic EM in a few steps per seed."""
    from ffn.model import save_model
    from test_ffn_inference import grow_model

    model, cfg = grow_model(delta=3, min_segment_size=30)
    # synthetic cytoplasm is ~150 and membranes darker: centre the normalisation between them
    cfg = dataclasses.replace(cfg, image_mean=125.0, image_stddev=10.0)
    save_model(model, cfg, directory)
    return str(directory)


def tiny_synapse_model(directory: Path) -> str:
    """The packaged synapse model when it exists, else a small fixed-seed random one (exercises the stage)."""
    from pipeline import synapse_model as sm

    try:
        return str(sm.resolve_model("synthetic_synapses"))
    except ConnectomeError:
        pass
    import keras

    keras.utils.set_random_seed(0)
    config = sm.SynapseModelConfig(features=4, dilations=(1, 2), z_dilations=(1, 1), z_kernel=(3, 3))
    sm.save_model(sm.build_model(config), config, directory)
    return str(directory)


def write_input(directory: Path, seed: int = 3) -> str:
    """A synthetic uint8 EM volume (zarr3) and its URL."""
    from pipeline.synthetic import SynthParams, generate_box

    params = SynthParams(seed=seed, shape_zyx=SHAPE)
    arrays = generate_box(params, Box.from_shape(SHAPE))
    url = str(directory / "raw.zarr")
    raw = create_volume(url, shape_zyx=SHAPE, dtype="uint8", voxel_size_xyz_nm=params.voxel_size_xyz_nm,
                        chunk_shape_zyx=(16, 32, 32), delete_existing=True)
    raw.write(raw.bounds, arrays["raw"])
    return url


def run_config(inputs: dict, out: Path, stages=STAGES) -> RunConfig:
    config = RunConfig(input=inputs["raw"], output=str(out), stages=list(stages))
    config.segment.model = inputs["ffn"]
    config.segment.block_shape = BLOCK
    config.segment.overlap = OVERLAP
    config.segment.pyramid_levels = 1
    config.synapses.model = inputs["synapses"]
    config.synapses.block_shape = BLOCK
    config.skeletonize.block_shape = BLOCK
    config.skeletonize.dust_threshold = 20
    return config


def config_file(config: RunConfig, path: Path, workers: int = 2) -> Path:
    """The same run as a YAML file for `connectome run`."""
    data = dump_config(config)
    data["cluster"] = {"kind": "local", "workers": workers, "threads_per_worker": 1, "dashboard": False}
    path.write_text(yaml.safe_dump(data))
    return path


def store_rows(store_path: Path) -> dict[str, pd.DataFrame]:
    """Every data table of a store (all versions' rows) plus the version list, in a fixed order."""
    from storage.store import ConnectomeStore

    out = {}
    with ConnectomeStore.open(store_path, read_only=True) as store:
        for table in DATA_TABLES:
            out[table] = store.backend.query(f"SELECT * FROM {table} ORDER BY ALL")
        out["versions"] = store.backend.query(
            "SELECT version, parent, kind, status, description FROM versions ORDER BY version")
    return out


def snapshot(out: Path) -> dict:
    """What a run produced: volumes (all scales), stage tables and the store."""
    snap: dict = {}
    for name in ("fragments", "segmentation"):
        vol = open_volume(f"precomputed://{out / name}")
        for scale in range(vol.num_scales):
            level = vol.at_scale(scale)
            snap[f"{name}/{scale}"] = level.read(level.bounds)
    for rel in ("lookup.parquet", "work/synapses.parquet", "work/skeletons/skeletons.parquet"):
        if (out / rel).exists():
            snap[rel] = pd.read_parquet(out / rel)
    for table, df in store_rows(out / "connectome.duckdb").items():
        snap[f"store/{table}"] = df
    return snap


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            pd.testing.assert_frame_equal(got[key].reset_index(drop=True), value.reset_index(drop=True),
                                          obj=key)


def _quiet(*args, **kwargs) -> None:
    pass


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fault-inputs")
    return {"raw": write_input(root), "ffn": tiny_ffn_model(root / "ffn"),
            "synapses": tiny_synapse_model(root / "synapse_model")}


@pytest.fixture(scope="module")
def client():
    with open_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(inputs, client, tmp_path_factory) -> dict:
    """An undisturbed run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_pipeline(run_config(inputs, out), client, progress=False, log=_quiet)
    snap = snapshot(out)
    assert len(np.unique(snap["segmentation/0"])) > 5, "the tiny model should find objects"
    assert len(snap["store/skeleton_nodes"]) > 0
    return snap


# ------------------------------------------------------------------------------------------- tests

def _kill_a_busy_worker(client, prefix: str, timeout: float = 120) -> int | None:
    """SIGKILL the worker process that is running a task whose key starts with `prefix`; returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = [addr for addr, keys in client.processing().items()
                if any(str(k).startswith(prefix) for k in keys)]
        if busy:
            time.sleep(0.5)  # let the block get going (model load, reads) before pulling the plug
            pid = client.run(os.getpid, workers=busy[:1]).get(busy[0])
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.05)
    return None


def test_worker_killed_mid_stage_gives_identical_output(inputs, client, reference, tmp_path):
    out = tmp_path / "run"
    outcome: dict = {}

    def drive():
        try:
            outcome["stages"] = run_pipeline(run_config(inputs, out), client, progress=False, log=_quiet)
        except BaseException as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    killed = _kill_a_busy_worker(client, "segment-")
    driver.join(300)
    assert killed is not None, "no segment block was seen running on a worker"
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    assert killed not in client.run(os.getpid).values(), "the killed worker process should be gone"
    assert_same(snapshot(out), reference)


def _cli_run(config_path: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config_path)], cwd=REPO,
                            start_new_session=True, text=True, **popen)


def test_driver_killed_mid_stage_then_resumed_gives_identical_output(inputs, client, reference, tmp_path):
    from storage.ledger import read_done_count

    out = tmp_path / "run"
    cfg = config_file(run_config(inputs, out), tmp_path / "run.yaml")
    proc = _cli_run(cfg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledgers = out / "work" / "ledgers"
    deadline, done = time.time() + 240, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            done = read_done_count(ledgers, "segment") if ledgers.exists() else 0
            if done >= 1:
                break
            time.sleep(0.05)
        state_at_kill = (out / "run_state.json").read_text() if (out / "run_state.json").exists() else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster
        proc.wait()
    assert done >= 1, "the driver should have finished a segment block before it was killed"
    assert '"segment"' not in state_at_kill, "the kill should land inside the segment stage"
    assert not (out / "segment_summary.json").exists()

    # resume: the same run again (here on the test's cluster, which saves starting another one); the ledger
    # keeps the finished blocks, so only the rest run
    done_at_resume = read_done_count(ledgers, "segment")
    stages = run_pipeline(run_config(inputs, out), client, progress=False, log=_quiet)
    assert list(stages) == STAGES and done_at_resume >= 1
    assert_same(snapshot(out), reference)


def test_run_interrupted_between_stages_resumes_without_duplicates(inputs, client, reference, tmp_path):
    out = tmp_path / "run"
    first = run_pipeline(run_config(inputs, out, stages=["segment"]), client, progress=False, log=_quiet)
    assert list(first) == ["segment"]
    partial = store_rows(out / "connectome.duckdb")
    assert len(partial["segments"]) > 0 and len(partial["synapses"]) == 0

    lines: list[str] = []
    rest = run_pipeline(run_config(inputs, out), client, progress=False, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert list(rest) == STAGES
    assert any("[segment] already finished" in line for line in lines), lines
    assert not any("[segment] starting" in line for line in lines)
    assert_same(snapshot(out), reference)  # incl. the versions table: no stage loaded twice

    # a third call with everything finished changes nothing
    run_pipeline(run_config(inputs, out), client, progress=False, log=_quiet)
    assert_same(snapshot(out), reference)


# ------------------------------------------------------------------------------------------- PostgreSQL

def _dump(store) -> dict[str, pd.DataFrame]:
    out = {t: store.backend.query(f"SELECT * FROM {t} ORDER BY 1, 2, version_from")
           for t in ("segments", "cell_types", "id_map", "synapses")}
    out["versions"] = store.backend.query("SELECT version, kind, status, description FROM versions ORDER BY version")
    return out


def _load(store, tables: dict, batches: int, *, after_batch=None) -> int:
    """One load version: small tables, then synapses in `batches` batches; resumable (resume=True, batch keys)."""
    v = store.begin_load("fault load", resume=True)
    for name in ("segments", "cell_types", "id_map"):
        getattr(store, f"write_{name}")(tables[name], version=v)
    syn = tables["synapses"]
    step = -(-syn.num_rows // batches)
    for i, start in enumerate(range(0, syn.num_rows, step)):
        store.write_synapses(syn.slice(start, step), version=v)
        if after_batch is not None:
            after_batch(i)
    store.commit(v)
    return v


@pytest.mark.postgres
def test_postgres_connection_dropped_mid_load_reload_is_identical(postgres_server):
    import psycopg

    from storage.store import ConnectomeStore
    from storage.store.synthetic import synthetic_connectome

    tables = synthetic_connectome(150, 40_000, fragments_per_segment=2, seed=11)
    clean_url, hit_url = postgres_server.new_database(), postgres_server.new_database()
    with ConnectomeStore.create(clean_url) as clean:
        _load(clean, tables, batches=8)
        want = _dump(clean)

    store = ConnectomeStore.create(hit_url)
    kills: list[int] = []
    admin = psycopg.connect(hit_url, autocommit=True)

    def terminate_writer() -> None:
        pid = store.backend.backend_pid()
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        kills.append(pid)

    # a killer thread drops the writer's connection while batches are copied, and the loop drops it between
    # batches; whatever the store cannot retry by itself surfaces as a ConnectomeError and the load is rerun
    stop = threading.Event()

    def killer():
        while not stop.is_set() and len(kills) < 6:
            time.sleep(0.15)
            if stop.is_set():
                break
            rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND pid <> pg_backend_pid() AND state = 'active'").fetchall()
            for (pid,) in rows:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                kills.append(pid)

    background = threading.Thread(target=killer, daemon=True)
    background.start()
    attempts, failures = 0, []
    try:
        while True:
            attempts += 1
            try:
                first = attempts == 1  # the resumed load skips stored batches; drop it only the first time
                _load(store, tables, batches=8,
                      after_batch=lambda i: terminate_writer() if first and i in (2, 5) else None)
                break
            except ConnectomeError as exc:
                failures.append(str(exc))
                assert "\n" not in str(exc)
                assert attempts < 10, failures
    finally:
        stop.set()
        background.join(10)
    assert len(kills) >= 2, "the writer's connection should have been dropped during the load"
    # a read on a connection the server dropped while idle is retried on a fresh one
    admin.execute("SELECT pg_terminate_backend(%s)", (store.backend.backend_pid(),))
    got = _dump(store)
    assert got.keys() == want.keys()
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    assert len(got["synapses"]) == 40_000  # nothing lost, nothing twice
    assert store.synapses(pre=7).equals(ConnectomeStore.open(clean_url).synapses(pre=7))
    admin.close()
    store.close()
