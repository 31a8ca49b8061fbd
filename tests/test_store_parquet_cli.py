"""Parquet releases (export, serverless read, import) and the `connectome query` command."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.cli import main
from storage import Connectome
from storage.errors import ConnectomeError
from storage.store import ConnectomeStore
from storage.store.synthetic import synthetic_connectome
from test_store import load, new_store

BACKENDS = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


def _answers(c, version=None):
    return {
        "cells": c.cells(cell_type="basket", version=version),
        "pre": c.synapses(pre=11, version=version),
        "bbox": c.synapses(bbox=((30_000, 30_000, 30_000), (150_000, 150_000, 150_000)), version=version),
        "partners": c.partners(9, direction="in", version=version),
        "matrix": c.connectivity(min_synapses=2, version=version),
        "types": c.cell_type_counts(version=version),
    }


@pytest.fixture(params=BACKENDS)
def edited_store(request, tmp_path):
    store = new_store(request, tmp_path)
    load(store, synthetic_connectome(80, 1500, seed=8))
    store.merge(7, 8, user="alice")
    yield store
    store.close()


def test_parquet_release_answers_like_the_store_without_a_server(edited_store, tmp_path):
    release = edited_store.export_parquet(tmp_path / "release")
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["tables"]["synapses"] == 1500 and manifest["latest_version"] == edited_store.version
    buckets = sorted(p.name for p in (release / "synapses").iterdir())
    assert len(buckets) > 1 and all(b.startswith("segment_bucket=") for b in buckets)
    with Connectome.open(release) as offline:
        assert offline.backend.read_only and offline.version == edited_store.version
        for version in (None, edited_store.version - 1):  # the merged version and the one before it
            want, got = _answers(edited_store, version), _answers(offline, version)
            for key in want:
                if isinstance(want[key].index, pd.RangeIndex):
                    pd.testing.assert_frame_equal(got[key], want[key], obj=key)
                else:
                    pd.testing.assert_frame_equal(got[key], want[key], obj=key, check_names=False)
        with pytest.raises(ConnectomeError, match="read-only"):
            offline.merge(1, 2)
    with pytest.raises(ConnectomeError, match="not empty"):
        edited_store.export_parquet(release)
    # import into a fresh DuckDB store keeps every version and edit
    imported = ConnectomeStore.import_parquet(release, tmp_path / "imported.duckdb")
    assert list(imported.versions()["kind"]) == list(edited_store.versions()["kind"])
    pd.testing.assert_frame_equal(imported.synapses(pre=7, version=edited_store.version - 1),
                                  edited_store.synapses(pre=7, version=edited_store.version - 1))
    assert len(imported.edits()) == 1
    undone = imported.undo()
    assert undone.segments_after == [7, 8]
    imported.close()


def test_a_release_written_by_the_previous_schema_imports(tmp_path):
    """Schema 1 releases have no skeleton_nodes.fragment_id: import fills it with NULL and records schema 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.store import schema

    store = ConnectomeStore.create(tmp_path / "s.duckdb")
    load(store, synthetic_connectome(20, 200, seed=4))
    release = store.export_parquet(tmp_path / "release")
    nodes = len(store.backend.query("SELECT * FROM skeleton_nodes"))
    store.close()
    for f in (release / "skeleton_nodes").glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.drop_columns(["fragment_id"]), f)
    meta = release / "store_meta"
    for f in meta.glob("*.parquet"):
        t = pq.read_table(f).to_pandas()
        t.loc[t.key == "schema_version", "value"] = "1"
        pq.write_table(pa.Table.from_pandas(t, preserve_index=False), f)
    with Connectome.open(release) as offline:  # read in place as it is
        assert len(offline.skeleton(3)) == 4
    imported = ConnectomeStore.import_parquet(release, tmp_path / "imported.duckdb")
    rows = imported.backend.query("SELECT fragment_id FROM skeleton_nodes")
    assert len(rows) == nodes and rows["fragment_id"].isna().all()
    version = imported.backend.query("SELECT value FROM store_meta WHERE key = 'schema_version'")["value"].iloc[0]
    assert version == str(schema.SCHEMA_VERSION)
    imported.close()


def test_query_command_prints_and_writes_tables(tmp_path, capsys):
    run = tmp_path / "run"
    store = ConnectomeStore.create(run / "connectome.duckdb")
    load(store, synthetic_connectome(50, 800, seed=9))
    expected_pre = store.synapses(pre=3)
    expected_cells = store.cells(cell_type="basket")
    matrix = store.connectivity()
    store.close()

    assert main(["query", str(run), "cells", "--type", "basket"]) == 0
    out, err = capsys.readouterr()
    assert len([l for l in out.splitlines()[1:] if l.strip()]) == len(expected_cells)
    assert f"{len(expected_cells)} rows at version" in err

    assert main(["query", str(run / "connectome.duckdb"), "synapses", "--pre", "3", "--out", str(tmp_path / "s.csv")]) == 0
    got = pd.read_csv(tmp_path / "s.csv")
    assert list(got["synapse_id"]) == list(expected_pre["synapse_id"])

    assert main(["query", str(run), "connectivity", "--by", "cell_type", "--out", str(tmp_path / "m.parquet")]) == 0
    m = pd.read_parquet(tmp_path / "m.parquet")
    assert int(m.to_numpy().sum()) == int(matrix.to_numpy().sum())

    assert main(["query", str(run), "synapses", "--pre", "123456789"]) == 2
    assert "error: unknown pre segment id" in capsys.readouterr().err
    assert main(["query", str(run), "cells", "--type", "x'; DROP TABLE synapses; --"]) == 2
    assert "error: unknown cell type" in capsys.readouterr().err
    assert main(["query", str(run), "synapses", "--limit", "5"]) == 0
    assert "more rows: --after" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "nowhere"), "cells"]) == 2


def test_query_command_reads_a_parquet_release(tmp_path, capsys):
    store = ConnectomeStore.create(tmp_path / "s.duckdb")
    load(store, synthetic_connectome(40, 500, seed=10))
    want = store.partners(5, direction="in")
    release = store.export_parquet(tmp_path / "release")
    store.close()
    assert main(["query", str(release), "partners", "--id", "5", "--direction", "in",
                 "--out", str(tmp_path / "p.csv")]) == 0
    got = pd.read_csv(tmp_path / "p.csv")
    assert list(got["partner_id"]) == list(want["partner_id"])
    assert main(["query", str(release), "versions"]) == 0
    assert "load" in capsys.readouterr().out
    assert main(["query", str(release), "skeleton", "--id", "3", "--out", str(tmp_path / "s.parquet")]) == 0
    nodes = pd.read_parquet(tmp_path / "s.parquet")
    assert len(nodes) == 4 and nodes["parent_id"].isna().sum() == 1  # the synthetic 4-node skeleton, one root
