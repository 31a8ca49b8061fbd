"""Store faults and concurrency: a batch failing half way, a killed loader, a dropped PostgreSQL connection,
readers during a load — each leaves committed versions intact and finishes identical to an undisturbed run."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow as pa
import pytest

from storage import Connectome
from storage.errors import ConnectomeError
from storage.store import ConnectomeStore
from storage.store.synthetic import synthetic_connectome
from test_store import load, new_store

BACKENDS = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request


def _extra_synapses(tables, offset: int, n: int) -> pa.Table:
    syn = tables["synapses"].slice(0, n).to_pandas()
    syn["synapse_id"] += offset
    return pa.Table.from_pandas(syn, preserve_index=False)


def _dump(store, table="synapses", key="synapse_id"):
    return store.backend.query(f"SELECT * FROM {table} ORDER BY {key}, version_from")


def test_batch_failing_half_way_leaves_previous_version_intact(backend_name, tmp_path):
    tables = synthetic_connectome(60, 600, seed=1)
    store = new_store(backend_name, tmp_path)
    v1 = load(store, tables)
    cells_v1, syn_v1 = store.cells(), store.synapses(post_type="basket")
    v2 = store.begin_load("bad load")
    bad = pd.DataFrame({"segment_id": pd.array([1, 2, None, 4], dtype="Int64"), "voxel_count": [1, 2, 3, 4]})
    with pytest.raises(ConnectomeError, match="rejected at version .*nothing of this batch was stored"):
        store.write_segments(bad, version=v2)
    bad_syn = _extra_synapses(tables, 10_000, 50).to_pandas()
    bad_syn.loc[25, "synapse_id"] = None
    with pytest.raises(ConnectomeError, match="rejected"):
        store.write_synapses(bad_syn, version=v2)
    assert store.version == v1
    pd.testing.assert_frame_equal(store.cells(), cells_v1)
    pd.testing.assert_frame_equal(store.synapses(post_type="basket"), syn_v1)
    for table in ("segments", "synapses", "load_batches"):
        col = "version" if table == "load_batches" else "version_from"
        assert store.backend.query(f"SELECT count(*) AS n FROM {table} WHERE {col} = {v2}")["n"].iloc[0] == 0
    assert store.backend.query("SELECT count(*) AS n FROM segments WHERE version_to IS NOT NULL")["n"].iloc[0] == 0
    # the same load, fixed, resumes and commits
    store.write_segments(pd.DataFrame({"segment_id": [1, 2], "voxel_count": [7, 8]}), version=v2)
    store.commit(v2)
    assert list(store.cells(ids=[1, 2])["voxel_count"]) == [7, 8]
    assert list(store.cells(ids=[1, 2], version=v1)["voxel_count"]) == list(cells_v1["voxel_count"][:2])
    store.close()


LOADER = """
def second_load(location, pause):
    import time
    import pyarrow as pa
    from storage.store import ConnectomeStore
    from storage.store.synthetic import synthetic_connectome
    store = ConnectomeStore.open(location)
    syn = synthetic_connectome(60, 3000, seed=2)["synapses"]
    i = syn.schema.get_field_index("synapse_id")
    syn = syn.set_column(i, "synapse_id", pa.array(syn["synapse_id"].to_numpy() + 100000))
    v = store.begin_load("second load", resume=True)
    for b in range(6):
        store.write_synapses(syn.slice(b * 500, 500), version=v)
        print("batch", b, flush=True)
        time.sleep(pause)
    store.commit(v)
    print("committed", v, flush=True)
    store.close()
"""


def _second_load_here(location: str) -> None:
    namespace: dict = {}
    exec(LOADER, namespace)
    namespace["second_load"](location, 0.0)


def _kill_loader_after(location: str, batches: int) -> str:
    """Run the second load in a fresh process and SIGKILL it once `batches` batches are committed."""
    script = LOADER + "\nimport sys\nsecond_load(sys.argv[1], 0.5)\n"
    proc = subprocess.Popen([sys.executable, "-c", script, location], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith(f"batch {batches - 1}"):
            proc.send_signal(signal.SIGKILL)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    return "\n".join(lines) + out


def test_killed_loader_resumes_to_identical_content(backend_name, tmp_path):
    tables = synthetic_connectome(60, 3000, seed=2)
    killed = new_store(backend_name, tmp_path, "killed")
    clean = new_store(backend_name, tmp_path, "clean")
    for store in (killed, clean):
        v1 = load(store, tables)
    killed_loc, clean_loc = killed.location, clean.location
    before = killed.synapses(pre=7)
    killed.close()
    clean.close()
    _second_load_here(clean_loc)  # undisturbed
    out = _kill_loader_after(killed_loc, batches=2)
    assert "committed" not in out
    with ConnectomeStore.open(killed_loc) as store:
        assert store.version == v1  # the half-done version is invisible
        pd.testing.assert_frame_equal(store.synapses(pre=7), before)
        assert store.backend.query("SELECT count(*) AS n FROM load_batches WHERE version = 2")["n"].iloc[0] >= 2
    _second_load_here(killed_loc)  # resume: skips the recorded batches, writes the rest
    with ConnectomeStore.open(killed_loc) as a, ConnectomeStore.open(clean_loc) as b:
        assert a.version == b.version == v1 + 1
        pd.testing.assert_frame_equal(_dump(a), _dump(b))
        pd.testing.assert_frame_equal(_dump(a, "id_map", "fragment_id"), _dump(b, "id_map", "fragment_id"))
        assert len(_dump(a)) == 6000


@pytest.mark.postgres
def test_postgres_connection_killed_mid_batch_is_retried_identically(postgres_server):
    import psycopg

    tables = synthetic_connectome(60, 2000, seed=4)
    extra = _extra_synapses(tables, 50_000, 1500)
    urls = [postgres_server.new_database() for _ in range(2)]
    stores = [ConnectomeStore.create(u) for u in urls]
    for s in stores:
        load(s, tables)
    # undisturbed
    with stores[1].loading("extra") as v:
        stores[1].write_synapses(extra, version=v)
    # disturbed: hold a lock so the writer's COPY waits, then kill the writer's backend
    store = stores[0]
    v = store.begin_load("extra")
    locker = psycopg.connect(urls[0])
    locker.execute("LOCK TABLE synapses IN ACCESS EXCLUSIVE MODE")
    result: dict = {}

    def write():
        try:
            result["n"] = store.write_synapses(extra, version=v)
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    t = threading.Thread(target=write)
    t.start()
    killed = []
    with psycopg.connect(urls[0], autocommit=True) as admin:
        deadline = time.time() + 20
        while time.time() < deadline and not killed:
            rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                                 "datname = current_database()").fetchall()
            for (pid,) in rows:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)
            time.sleep(0.05)
    locker.rollback()
    locker.close()
    t.join(60)
    assert killed, "the writer never waited on the lock"
    assert "error" not in result, result.get("error")
    assert result["n"] == 1500
    store.commit(v)
    pd.testing.assert_frame_equal(_dump(stores[0]), _dump(stores[1]))
    assert stores[0].synapses(post_type="basket").equals(stores[1].synapses(post_type="basket"))
    for s in stores:
        s.close()


def test_readers_see_one_consistent_version_while_a_load_runs(backend_name, tmp_path):
    tables = synthetic_connectome(80, 2000, seed=6)
    store = new_store(backend_name, tmp_path)
    v1 = load(store, tables)
    reader = store if backend_name.param == "duckdb" else Connectome.open(store.location)
    base_syn = reader.synapses(post_type="basket")
    base_conn = reader.connectivity()
    retyped = tables["cell_types"].to_pandas().assign(cell_type="basket")
    done = threading.Event()
    errors = []

    def writer():
        try:
            with store.loading("concurrent") as v:
                for i in range(5):
                    store.write_synapses(_extra_synapses(tables, 100_000 * (i + 1), 300), version=v)
                    time.sleep(0.02)
                store.write_cell_types(retyped, version=v)
                time.sleep(0.05)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while not done.is_set() or len(seen) < 3:
        syn = reader.synapses(post_type="basket")
        conn = reader.connectivity(version=syn.attrs["version"])
        seen.append(syn.attrs["version"])
        if syn.attrs["version"] == v1:
            pd.testing.assert_frame_equal(syn, base_syn)
            pd.testing.assert_frame_equal(conn, base_conn)
        if done.is_set() and len(seen) >= 3:
            break
    t.join()
    assert not errors, errors
    assert v1 in seen
    final = reader.synapses(post_type="basket")
    assert final.attrs["version"] == v1 + 1
    everything = reader.synapses(version=v1 + 1)
    assert len(everything) > len(base_syn) + 1000  # the five extra batches arrived together
    # every typed cell is a basket cell now, at the new version only
    assert list(final["synapse_id"]) == list(everything.loc[everything.post_cell_type.notna(), "synapse_id"])
    pd.testing.assert_frame_equal(reader.synapses(post_type="basket", version=v1), base_syn)
    if reader is not store:
        reader.close()
    store.close()

