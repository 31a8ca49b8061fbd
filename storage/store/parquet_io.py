"""Parquet release of a store: every table, all versions, readable without a server.

Layout::

    release/manifest.json                     format, schema version, row counts, latest version, bucket width
    release/<table>/part-0.parquet            one directory per table
    release/synapses/segment_bucket=K/*.parquet   synapses partitioned by presynaptic segment id range
                                                  (segment at the latest version // bucket width), sorted by
                                                  pre_fragment_id so row-group statistics prune lookups

Why keep every version: a downloaded release answers the same queries (``version=`` included) as the live store;
``Connectome.open(release_dir)`` puts DuckDB views named like the tables over these files. The export is written
to a temporary sibling and renamed when complete, so a half-written release never looks finished.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.errors import ConnectomeError
from storage.store import migrate, schema, versions

FORMAT = "connectome-store-parquet"
META_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])


def _sql_path(path: Path) -> str:
    s = str(path)
    if "'" in s:
        raise ConnectomeError(f"parquet release {s}: path must not contain a quote character")
    return s


def _read(store, name: str, sql: str, arrow_schema: pa.Schema) -> pa.Table:
    backend = store.backend
    if backend.dialect == "duckdb":
        return backend.query_arrow(sql).cast(arrow_schema)
    list_cols = [f.name for f in arrow_schema if pa.types.is_list(f.type)]
    if list_cols:
        return pa.Table.from_pandas(backend.query(sql), schema=arrow_schema, preserve_index=False)
    raw = backend.copy_out_csv(sql)
    types = {f.name: f.type for f in arrow_schema}
    table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(
        column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False,
        true_values=["t", "true"], false_values=["f", "false"]))
    return table.select(arrow_schema.names).cast(arrow_schema)


def export_store(store, directory: Path, bucket_width: int | None = None) -> Path:
    backend = store.backend
    if versions.pending(backend):
        raise ConnectomeError(f"cannot export {backend.location}: version {versions.pending(backend)[0]} is pending")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ConnectomeError(f"parquet release {directory}: exists and is not empty")
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    latest = versions.latest_committed(backend)
    counts: dict[str, int] = {}
    for name, t in schema.TABLES.items():
        if name == "synapses":
            continue
        cols = ", ".join(t.column_names)
        order = ", ".join(t.key)
        table = _read(store, name, f"SELECT {cols} FROM {name} ORDER BY {order}", t.arrow_schema())
        (tmp / name).mkdir()
        pq.write_table(table, tmp / name / "part-0.parquet")
        counts[name] = table.num_rows
    meta = _read(store, "store_meta", "SELECT key, value FROM store_meta ORDER BY key", META_SCHEMA)
    (tmp / "store_meta").mkdir()
    pq.write_table(meta, tmp / "store_meta" / "part-0.parquet")

    # synapses, partitioned by presynaptic segment (at the latest version) range
    max_seg = versions.scalar(backend.query("SELECT max(segment_id) AS x FROM id_map"))
    max_seg = 0 if max_seg is None else int(max_seg)
    width = int(bucket_width) if bucket_width else max(1, (max_seg + 32) // 32)
    t = schema.SYNAPSES
    cols = ", ".join(f"s.{c}" for c in t.column_names)
    div = "//" if backend.dialect == "duckdb" else "/"
    sql = (f"SELECT {cols}, COALESCE(m.segment_id, 0) {div} {width} AS segment_bucket FROM synapses s LEFT JOIN "
           f"(SELECT fragment_id, segment_id FROM id_map WHERE version_from <= {latest} AND "
           f"(version_to IS NULL OR version_to > {latest})) m ON m.fragment_id = s.pre_fragment_id "
           "ORDER BY segment_bucket, s.pre_fragment_id, s.synapse_id")
    n_syn = int(backend.query("SELECT count(*) AS n FROM synapses")["n"].iloc[0])
    out = tmp / "synapses"
    if n_syn == 0:
        (out / "segment_bucket=0").mkdir(parents=True)
        pq.write_table(t.arrow_schema().empty_table(), out / "segment_bucket=0" / "part-0.parquet")
    elif backend.dialect == "duckdb":
        backend.execute(f"COPY ({sql}) TO '{_sql_path(out)}' (FORMAT parquet, PARTITION_BY (segment_bucket), "
                        "ROW_GROUP_SIZE 100000)")
    else:
        full = t.arrow_schema().append(pa.field("segment_bucket", pa.int64()))
        table = _read(store, "synapses", sql, full)
        ds.write_dataset(table, out, format="parquet", partitioning=["segment_bucket"], partitioning_flavor="hive",
                         max_rows_per_group=100_000)
    counts["synapses"] = n_syn
    manifest = {"format": FORMAT, "schema_version": schema.SCHEMA_VERSION, "latest_version": latest,
                "bucket_width": width, "tables": counts, "source": backend.dialect}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if directory.exists():
        directory.rmdir()
    tmp.rename(directory)
    return directory


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConnectomeError(f"parquet release {directory}: cannot read manifest.json ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ConnectomeError(f"parquet release {directory}: manifest.json format is {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def create_views(con, directory: Path) -> None:
    """DuckDB views named like the store tables over a release's Parquet files."""
    read_manifest(directory)
    for name in list(schema.TABLES) + ["store_meta"]:
        path = Path(directory) / name
        if not path.is_dir():
            raise ConnectomeError(f"parquet release {directory}: table directory {name}/ missing")
        if name == "synapses":
            con.execute(f"CREATE VIEW synapses AS SELECT * EXCLUDE (segment_bucket) FROM read_parquet("
                        f"'{_sql_path(path)}/**/*.parquet', hive_partitioning = true)")
        else:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{_sql_path(path)}/*.parquet')")


def _with_new_columns(table: pa.Table, t: schema.Table) -> pa.Table:
    """A release written by an older schema lacks the (nullable) columns added since: they come in as NULL."""
    for c in t.columns:
        if c.name not in table.column_names:
            table = table.append_column(c.name, pa.nulls(table.num_rows, schema.TYPES[c.type][2]))
    return table


def import_store(store, directory: Path, chunk_rows: int = 1_000_000) -> None:
    """Load a release into an empty store, all versions kept."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    backend = store.backend
    n_versions = int(backend.query("SELECT count(*) AS n FROM versions")["n"].iloc[0])
    n_rows = sum(int(backend.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in schema.WRITABLE)
    if n_versions > 1 or n_rows:
        raise ConnectomeError(f"cannot import into {backend.location}: the store is not empty")
    with backend.transaction() as tx:
        tx.execute("DELETE FROM versions")
        tx.execute("DELETE FROM store_meta")
        tx.insert_arrow("store_meta", pq.read_table(directory / "store_meta"))
        for name, t in schema.TABLES.items():
            if name == "synapses":
                dataset = ds.dataset(directory / name, format="parquet", partitioning="hive")
                table = dataset.to_table(columns=[c for c in t.column_names if c in dataset.schema.names])
            else:
                table = pq.read_table(directory / name)
            table = _with_new_columns(table, t).select(t.column_names).cast(t.arrow_schema())
            if table.num_rows != manifest["tables"].get(name, table.num_rows):
                raise ConnectomeError(f"parquet release {directory}: table {name} has {table.num_rows} rows, "
                                      f"manifest says {manifest['tables'][name]}")
            for start in range(0, table.num_rows, chunk_rows):
                tx.insert_arrow(name, table.slice(start, chunk_rows))
        migrate.record_version(tx)  # a release written by an older schema is now held in this one's tables
    if backend.dialect == "postgres":
        backend.execute("ANALYZE")
    else:
        backend.cluster("synapses")
        backend.cluster("id_map")
