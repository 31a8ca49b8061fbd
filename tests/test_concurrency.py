"""Queries while a stage writes the store see one committed version, never a half-loaded one.

A loader thread writes synapses in batches, several load versions one after another (as stages do); a reader
queries counts at "the latest version" as fast as it can. Every answer must equal the totals of the committed
version it reports in ``df.attrs['version']``, and every version a reader saw must be one the loader committed.
DuckDB (one process, shared connection) and PostgreSQL (a separate connection) both.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from storage import Connectome
from storage.store import ConnectomeStore
from storage.store.synthetic import synthetic_connectome

LOADS, BATCHES, BATCH_ROWS = 4, 5, 200


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request, tmp_path):
    """(writer store, reader) on the same location."""
    if request.param == "duckdb":
        store = ConnectomeStore.create(tmp_path / "c.duckdb", threads=1)
        yield store, store
        store.close()
    else:
        url = request.getfixturevalue("postgres_server").new_database()
        store = ConnectomeStore.create(url)
        reader = Connectome.open(url)
        yield store, reader
        reader.close()
        store.close()


def _batch(tables: dict, load: int, batch: int) -> pa.Table:
    syn = tables["synapses"].slice(0, BATCH_ROWS).to_pandas()
    syn["synapse_id"] += 1_000_000 * (load + 1) + 10_000 * batch
    return pa.Table.from_pandas(syn, preserve_index=False)


def test_counts_during_loads_always_match_a_committed_version(stores):
    store, reader = stores
    tables = synthetic_connectome(60, 1000, seed=8)
    with store.loading("base") as v0:
        for name in ("segments", "cell_types", "id_map", "synapses"):
            getattr(store, f"write_{name}")(tables[name], version=v0)
    totals = {v0: 1000}  # committed version -> number of synapse rows (valid or not)
    cells = len(store.cells())
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Event()

    def loader():
        try:
            n = 1000
            for load in range(LOADS):
                v = store.begin_load(f"load {load}")
                for batch in range(BATCHES):
                    store.write_synapses(_batch(tables, load, batch), version=v)
                    n += BATCH_ROWS
                    time.sleep(0.01)
                with lock:
                    totals[v] = n  # recorded before commit: a reader may see v right after
                store.commit(v)
                time.sleep(0.02)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=loader)
    thread.start()
    seen: list[tuple[int, int, int]] = []
    while not done.is_set() or len(seen) < 5:
        syn = reader.synapses(valid_only=False)
        v = syn.attrs["version"]
        assert syn.attrs["complete"]
        # a second query pinned to the same version agrees (versions are immutable)
        again = reader.synapses(valid_only=False, version=v, limit=BATCH_ROWS * 50)
        seen.append((v, len(syn), len(again)))
        assert len(reader.cells(version=v)) == cells
        if done.is_set() and len(seen) >= 5:
            break
    thread.join(120)
    assert not errors, errors
    with lock:
        for v, n, n_again in seen:
            assert v in totals, f"read version {v} was never committed"
            assert n == totals[v] == n_again, (v, n, totals[v])
    versions_seen = {v for v, _, _ in seen}
    assert len(versions_seen) >= 2, "the reader should have seen the store change while loading"
    assert reader.version == max(totals) and len(reader.synapses(valid_only=False)) == 1000 + LOADS * BATCHES * BATCH_ROWS
    pending = store.versions()
    assert (pending["status"] == "committed").all()
