"""Writing the store: create/open, versions for loads, and batch writers the pipeline stages call.

Why batches are transactions: each ``write_*`` call is one transaction that stores the rows *and* a record of the
batch (``load_batches``), under a pending version. A crash or a dropped connection loses at most the batch in
flight; re-running the load (``loading(..., resume=True)``) skips recorded batches and rewrites the rest, so the
result is identical to an undisturbed run. Readers never see a pending version.

Input columns are listed per table in `schema.py` (``TABLES[name].input_columns()``) and in
/tmp/team/STORE_SCHEMA.md; pass a ``pyarrow.Table`` or ``pandas.DataFrame``.
"""

from __future__ import annotations

import hashlib
import itertools
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import ConnectomeError
from storage.store import morton, schema, versions
from storage.store.backend import ConnectionLost, open_backend
from storage.store.connectome import Connectome

RETRIES = 3
_stage_names = itertools.count()
_DEFAULTS = {
    "cell_types": {"classification_system": "default", "source": "pipeline"},
    "synapses": {"valid": True},
}


def _arrow(data, what: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, dict):
        return pa.table(data)
    raise ConnectomeError(f"{what}: expected a pyarrow.Table or pandas.DataFrame, got {type(data).__name__}")


def _ids(col: pa.ChunkedArray, name: str, what: str, allow_zero: bool) -> pa.ChunkedArray:
    if not pa.types.is_integer(col.type):
        if pa.types.is_floating(col.type):
            arr = col.to_numpy(zero_copy_only=False)
            if np.any(np.isfinite(arr) & (arr != np.round(arr))):
                raise ConnectomeError(f"{what}: column {name} holds non-integer ids")
        elif not pa.types.is_null(col.type):
            raise ConnectomeError(f"{what}: column {name} must hold integer ids, got {col.type}")
    if col.null_count == len(col):
        return col.cast(pa.int64())
    lo, hi = pc.min(col).as_py(), pc.max(col).as_py()
    if hi is not None and hi > morton_max_id():
        raise ConnectomeError(f"{what}: column {name} has id {hi} >= 2**63 (ids must fit a signed 64-bit integer)")
    if lo is not None and (lo < 0 or (lo == 0 and not allow_zero)):
        raise ConnectomeError(f"{what}: column {name} has id {lo}; ids must be > 0")
    return col.cast(pa.int64())


def morton_max_id() -> int:
    return (1 << 63) - 1


def prepare(table_name: str, data, version: int) -> tuple[pa.Table, pa.Table | None]:
    """Validate and complete a batch: schema column order and types, defaults, morton keys, version columns.

    Returns the rows and, for synapses given by segment ids, the identity id-map rows they imply.
    """
    what = f"write_{table_name}"
    t = schema.TABLES[table_name]
    tbl = _arrow(data, what)
    cols = set(tbl.column_names)
    identity = None
    if table_name == "synapses" and not {"pre_fragment_id", "post_fragment_id"} <= cols:
        if not {"pre_segment_id", "post_segment_id"} <= cols:
            raise ConnectomeError(f"{what}: needs pre_fragment_id/post_fragment_id or pre_segment_id/post_segment_id")
        tbl = tbl.rename_columns([{"pre_segment_id": "pre_fragment_id", "post_segment_id": "post_fragment_id"}.get(c, c)
                                  for c in tbl.column_names])
        identity = True
    elif table_name == "synapses":
        tbl = tbl.drop_columns([c for c in ("pre_segment_id", "post_segment_id") if c in cols])
    allowed = t.input_columns()
    unknown = sorted(set(tbl.column_names) - set(allowed))
    if unknown:
        raise ConnectomeError(f"{what}: unknown column(s) {unknown}; allowed: {allowed}")
    missing = [c for c in t.required if c not in tbl.column_names]
    if missing:
        raise ConnectomeError(f"{what}: missing required column(s) {missing}")
    n = tbl.num_rows
    out = {}
    for c in t.columns:
        if c.name in tbl.column_names:
            col = tbl[c.name]
            if c.type == "id":
                col = _ids(col, c.name, what, allow_zero=c.name not in ("segment_id", "fragment_id"))
            elif c.type == "pos":
                arr = col.to_numpy(zero_copy_only=False) if col.null_count == 0 else None
                if arr is not None and arr.dtype.kind == "f":
                    col = pa.chunked_array([np.round(arr)])
                try:
                    col = col.cast(pa.int32())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ConnectomeError(f"{what}: column {c.name} is not an integer nm position ({exc})") from None
            else:
                try:
                    col = col.cast(schema.TYPES[c.type][2])
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ConnectomeError(f"{what}: column {c.name} cannot be {c.type} ({exc})") from None
            out[c.name] = col
        elif c.name == "morton":
            xyz = [tbl[a].to_numpy(zero_copy_only=False) for a in ("x_nm", "y_nm", "z_nm")]
            if any(np.isnan(a.astype(float)).any() for a in xyz):
                raise ConnectomeError(f"{what}: x_nm/y_nm/z_nm must not be null")
            try:
                out[c.name] = pa.array(morton.encode(*xyz), pa.int64())
            except ConnectomeError as exc:
                raise ConnectomeError(f"{what}: {exc}") from None
        elif c.name == "version_from":
            out[c.name] = pa.array(np.full(n, version, np.int32))
        elif c.name in _DEFAULTS.get(table_name, {}):
            out[c.name] = pa.array([_DEFAULTS[table_name][c.name]] * n, schema.TYPES[c.type][2])
        else:
            out[c.name] = pa.nulls(n, schema.TYPES[c.type][2])
    rows = pa.table(out, schema=t.arrow_schema())
    if identity:
        ids = np.union1d(rows["pre_fragment_id"].to_numpy(), rows["post_fragment_id"].to_numpy())
        ids = ids[ids != 0]
        identity = pa.table({"fragment_id": ids, "segment_id": ids, "voxel_count": pa.nulls(len(ids), pa.int64()),
                             "version_from": np.full(len(ids), version, np.int32),
                             "version_to": pa.nulls(len(ids), pa.int32())},
                            schema=schema.TABLES["id_map"].arrow_schema())
    return rows, identity


def batch_key(rows: pa.Table) -> str:
    """Content hash of a batch (so a retried batch is recognised)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as w:
        w.write_table(rows)
    return hashlib.blake2b(sink.getvalue().to_pybytes(), digest_size=16).hexdigest()


class ConnectomeStore(Connectome):
    """The store opened for writing: create/open, load versions, batch writers, Parquet export/import.

    ``ConnectomeStore.create("run/connectome.duckdb")`` or ``create("postgresql://user@host/db")``; then::

        with store.loading("synapses stage") as v:
            store.write_synapses(batch, version=v)   # one transaction per call
    """

    @classmethod
    def create(cls, location: str | Path, *, threads: int | None = None) -> "ConnectomeStore":
        """Create (or open, if it already exists) a store and make sure its schema is there."""
        from storage.store import migrate

        backend = open_backend(location, create=True, threads=threads)
        backend.init_schema()
        with backend.transaction() as tx:
            if migrate.stored_version(tx) == 0:
                tx.execute("INSERT INTO store_meta (key, value) VALUES ('schema_version', $s)",
                           {"s": str(schema.SCHEMA_VERSION)})
            if tx.query("SELECT version FROM versions").empty:
                versions.begin(tx, "load", "empty store", None, status="committed")
        migrate.upgrade(backend)  # an existing store made by an older schema (a new one is current already)
        return cls(backend)

    @classmethod
    def open(cls, location: str | Path, *, read_only: bool = False, threads: int | None = None) -> "ConnectomeStore":
        return super().open(location, read_only=read_only, threads=threads)  # type: ignore[return-value]

    # ------------------------------------------------------------ versions
    def begin_load(self, description: str = "", *, user: str | None = None, resume: bool = False) -> int:
        """Start a pending version for a load; with ``resume=True`` continue the pending one if there is one."""
        if resume:
            busy = versions.pending(self.backend)
            if busy:
                return busy[-1]
        with self.backend.transaction() as tx:
            return versions.begin(tx, "load", description, user)

    def commit(self, version: int) -> None:
        """Make a pending version readable (and the default for queries)."""
        if versions.status_of(self.backend, version) != "pending":
            raise ConnectomeError(f"cannot commit version {version}: it is {versions.status_of(self.backend, version)}")
        wrote: set = set()
        if self.backend.dialect == "duckdb":
            wrote = set(self.backend.query("SELECT DISTINCT table_name FROM load_batches WHERE version = $v",
                                           {"v": int(version)})["table_name"])
        # DuckDB: the ordered rewrites and the status flip are one transaction, so no batch can slip in between
        # (the copy in postsynaptic order is then exactly the committed rows) and a crash leaves both undone.
        with self.backend.transaction() as tx:
            if "synapses" in wrote:
                self.backend.cluster("synapses", tx)
            if wrote & {"synapses", "id_map"}:
                self.backend.cluster("id_map", tx)
            versions.commit(tx, version)
        if self.backend.dialect == "postgres":
            try:  # planner statistics only: the version is committed already, a lost connection here is no failure
                self.backend.execute("ANALYZE")
            except ConnectomeError:
                pass

    def abort(self, version: int) -> None:
        """Drop everything a pending version wrote; the previous version is untouched."""
        if versions.status_of(self.backend, version) != "pending":
            raise ConnectomeError(f"cannot abort version {version}: it is {versions.status_of(self.backend, version)}")
        with self.backend.transaction() as tx:
            versions.abort(tx, version)

    @contextmanager
    def loading(self, description: str = "", *, user: str | None = None, resume: bool = False):
        """A load version: yields its number, commits it when the block finishes.

        If the block raises, the version stays pending (invisible to readers) so the load can be resumed with
        ``resume=True``, or dropped with ``abort(version)``.
        """
        v = self.begin_load(description, user=user, resume=resume)
        yield v
        self.commit(v)

    # ------------------------------------------------------------ writers
    def _version_for_write(self, version) -> tuple[int, bool]:
        if version is None:
            busy = versions.pending(self.backend)
            if busy:
                return busy[-1], False
            return self.begin_load("single batch"), True
        v = int(version)
        status = versions.status_of(self.backend, v)
        if status != "pending":
            raise ConnectomeError(f"cannot write at version {v}: it is {status or 'unknown'} "
                                  "(start a load with begin_load() or loading())")
        return v, False

    def _write(self, table_name: str, data, version=None, key: str | None = None) -> int:
        v, auto = self._version_for_write(version)
        rows, identity = prepare(table_name, data, v)
        key = key or batch_key(rows)
        for attempt in range(RETRIES):
            try:
                n = self._write_batch(table_name, rows, identity, v, key)
                break
            except ConnectionLost:
                if attempt == RETRIES - 1:
                    raise
            except ConnectomeError:
                raise
            except Exception as exc:
                if not type(exc).__module__.startswith(("duckdb", "psycopg", "_duckdb")):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConnectomeError(f"write_{table_name}: batch of {rows.num_rows} rows rejected at version {v} "
                                      f"({first}); nothing of this batch was stored") from None
        if auto:
            self.commit(v)
        return n

    def _write_batch(self, name: str, rows: pa.Table, identity: pa.Table | None, v: int, key: str) -> int:
        t = schema.TABLES[name]
        with self.backend.transaction() as tx:
            status = tx.query("SELECT status FROM versions WHERE version = $v", {"v": v})
            if status.empty or status["status"].iloc[0] != "pending":
                raise ConnectomeError(f"cannot write at version {v}: it is no longer pending")
            done = tx.query("SELECT n_rows FROM load_batches WHERE version = $v AND table_name = $t AND "
                            "batch_key = $k", {"v": v, "t": name, "k": key})
            if not done.empty:
                return 0
            if name == "synapses" and identity is None:
                tx.insert_arrow(name, rows)
            elif name == "synapses":
                # Given by segment id: attach each partner to its segment's representative (smallest) fragment at
                # this version, so the synapse follows that fragment through merges/splits; a segment with no
                # fragments becomes its own single fragment (identity id-map row).
                staged = tx.stage(f"syn_{next(_stage_names)}", name, rows)
                cols = ["COALESCE(r1.fragment_id, b.pre_fragment_id)" if c == "pre_fragment_id" else
                        "COALESCE(r2.fragment_id, b.post_fragment_id)" if c == "post_fragment_id" else f"b.{c}"
                        for c in t.column_names]
                tx.execute(
                    f"WITH rep AS (SELECT segment_id, min(fragment_id) AS fragment_id FROM id_map "
                    f"WHERE version_to IS NULL GROUP BY segment_id) "
                    f"INSERT INTO synapses ({', '.join(t.column_names)}) SELECT {', '.join(cols)} FROM {staged} b "
                    "LEFT JOIN rep r1 ON r1.segment_id = b.pre_fragment_id "
                    "LEFT JOIN rep r2 ON r2.segment_id = b.post_fragment_id")
            else:
                staged = tx.stage(f"batch_{next(_stage_names)}", name, rows)
                match = " AND ".join(f"b.{k} = {name}.{k}" for k in t.key)
                tx.execute(f"UPDATE {name} SET version_to = $v WHERE version_to IS NULL AND version_from < $v AND "
                           f"EXISTS (SELECT 1 FROM {staged} b WHERE {match})", {"v": v})
                cols = ", ".join(t.column_names)
                tx.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM {staged}")
            if identity is not None and identity.num_rows:
                self._identity_rows(tx, identity, v)
            tx.execute("INSERT INTO load_batches (version, table_name, batch_key, n_rows, written_at) "
                       "VALUES ($v, $t, $k, $n, $w)",
                       {"v": v, "t": name, "k": key, "n": rows.num_rows, "w": versions.now()})
        return rows.num_rows

    def _identity_rows(self, tx, identity: pa.Table, v: int) -> None:
        """Segments of a segment-id synapse batch that have no fragment become their own fragment."""
        staged = tx.stage(f"ids_{next(_stage_names)}", "id_map", identity)
        need = (f"need AS (SELECT b.* FROM {staged} b WHERE b.segment_id NOT IN "
                "(SELECT segment_id FROM id_map WHERE version_to IS NULL))")
        clash = tx.query(f"WITH {need} SELECT n.fragment_id, m.segment_id FROM need n JOIN id_map m ON "
                         "m.fragment_id = n.fragment_id WHERE m.version_to IS NULL AND m.segment_id <> n.segment_id "
                         "ORDER BY n.fragment_id LIMIT 5")
        if not clash.empty:
            pairs = [(int(a), int(b)) for a, b in zip(clash["fragment_id"], clash["segment_id"])]
            raise ConnectomeError(
                f"write_synapses: segment ids {[a for a, _ in pairs]} have no fragments in the id map but are fragment "
                f"ids of other segments {[b for _, b in pairs]}; pass pre_fragment_id/post_fragment_id instead")
        cols = ", ".join(schema.TABLES["id_map"].column_names)
        tx.execute(f"INSERT INTO id_map ({cols}) WITH {need} SELECT {cols} FROM need")

    def write_segments(self, data, version=None, *, key: str | None = None) -> int:
        """Segments: segment_id (required), voxel_count, bbox_min/max_{x,y,z}_nm (max exclusive),
        centroid_{x,y,z}_nm. A segment_id written again at a later version supersedes the old row."""
        return self._write("segments", data, version, key)

    def write_cell_types(self, data, version=None, *, key: str | None = None) -> int:
        """Cell types: segment_id, cell_type (required), confidence, classification_system ('default'),
        source ('pipeline'; use 'model:<name>' or 'person:<name>')."""
        return self._write("cell_types", data, version, key)

    def write_skeleton_nodes(self, data, version=None, *, key: str | None = None) -> int:
        """Skeleton nodes: segment_id, node_id, x_nm, y_nm, z_nm (required), radius_nm, parent_id (NULL = root),
        compartment, compartment_confidence."""
        return self._write("skeleton_nodes", data, version, key)

    def write_synapses(self, data, version=None, *, key: str | None = None) -> int:
        """Synapses: synapse_id, x_nm, y_nm, z_nm (cleft) and pre_fragment_id/post_fragment_id or
        pre_segment_id/post_segment_id (then identity id-map rows are added); optional pre_/post_{x,y,z}_nm,
        size_voxels, score, valid (default true). Partner 0 = none."""
        return self._write("synapses", data, version, key)

    def write_embeddings(self, data, version=None, *, key: str | None = None) -> int:
        """Embeddings: segment_id, model (required), node_id, vector (list<float32>) or uri + row_index."""
        return self._write("embeddings", data, version, key)

    def write_id_map(self, data, version=None, *, key: str | None = None) -> int:
        """Fragment -> segment map: fragment_id, segment_id (required), voxel_count (fragment size)."""
        return self._write("id_map", data, version, key)

    # ------------------------------------------------------------ Parquet
    def export_parquet(self, directory: str | Path, *, bucket_width: int | None = None) -> Path:
        """Every table to Parquet (synapses partitioned by presynaptic segment id range); see parquet_io."""
        from storage.store.parquet_io import export_store

        return export_store(self, Path(directory), bucket_width=bucket_width)

    @classmethod
    def import_parquet(cls, directory: str | Path, location: str | Path, *, threads: int | None = None) -> "ConnectomeStore":
        """A new store at ``location`` holding a Parquet release (all versions kept)."""
        from storage.store.parquet_io import import_store

        store = cls.create(location, threads=threads)
        import_store(store, Path(directory))
        return store
