"""DuckDB backend: one embedded file, the default store.

Why thread-local cursors: a DuckDB connection object is not safe to share between threads, but cursors of one
database are, and they share MVCC snapshots — so a reader thread keeps seeing committed data while a writer
thread's batch transaction is open. Writes are serialised by a lock (DuckDB allows one writer process anyway).
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from storage.errors import ConnectomeError
from storage.store import schema

# Physical order of tables after a load (zone maps then prune row groups for lookups on the leading column).
CLUSTER_ORDER = {"synapses": ("pre_fragment_id", "synapse_id"), "id_map": ("segment_id", "fragment_id")}
# A second copy of the synapses in postsynaptic order, rebuilt whenever the synapses are clustered, so input-side
# lookups (synapses(post=...), partners(direction="in")) prune row groups as presynaptic ones do (PostgreSQL has a
# b-tree on post_fragment_id instead). store_meta[POST_COPY] = the latest version when it was built; readers use
# it only when no committed version wrote synapses after that (see Connectome._post_copy).
POST_COPY = "synapses_by_post"
POST_ORDER = ("post_fragment_id", "synapse_id")

_names = itertools.count()
_generations: dict[str, int] = {}  # database path -> number of committed write transactions in this process
_generations_lock = threading.Lock()


class _DuckTx:
    def __init__(self, cur: duckdb.DuckDBPyConnection):
        self.cur = cur
        self._registered: list[str] = []

    def execute(self, sql: str, params: dict | None = None) -> None:
        self.cur.execute(sql, params or None)

    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self.cur.execute(sql, params or None).df()

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        name = f"_arrow_{next(_names)}"
        self.cur.register(name, data)
        try:
            cols = ", ".join(data.column_names)
            self.cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
        finally:
            self.cur.unregister(name)

    def stage(self, name: str, like: str, data: pa.Table) -> str:
        self.cur.register(name, data)
        self._registered.append(name)
        return name

    def close(self) -> None:
        for name in self._registered:
            try:
                self.cur.unregister(name)
            except duckdb.Error:
                pass


class DuckDBBackend:
    dialect = "duckdb"

    def __init__(self, path: Path | str | None, *, read_only: bool = False, threads: int | None = None):
        self.location = str(path) if path is not None else ":memory:"
        self.read_only = read_only
        try:
            self._db = duckdb.connect(self.location, read_only=read_only)
        except duckdb.ConnectionException:
            # the file is already open read-write in this process (DuckDB shares one instance per file and
            # refuses a second configuration): share it; read-only is then enforced by transaction()
            self._db = duckdb.connect(self.location)
        except duckdb.IOException as exc:
            raise ConnectomeError(f"connectome store {self.location}: cannot open ({str(exc).splitlines()[0]})") from None
        if threads:
            self._db.execute(f"SET threads = {int(threads)}")
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self.parquet_dir: Path | None = None
        self._key = str(Path(self.location).resolve()) if path is not None else f":memory:{id(self)}"

    def write_generation(self) -> tuple[str, int]:
        """Changes whenever a write transaction on this database commits in this process (the only writer
        DuckDB allows), so readers may cache 'the latest version' until it changes."""
        return (self._key, _generations.get(self._key, 0))

    @classmethod
    def over_parquet(cls, directory: Path, threads: int | None = None) -> "DuckDBBackend":
        """An in-memory database whose tables are views over a Parquet release (read-only)."""
        from storage.store.parquet_io import create_views

        backend = cls(None, threads=threads)
        create_views(backend._db, Path(directory))
        backend.read_only = True
        backend.parquet_dir = Path(directory)
        backend.location = str(directory)
        return backend

    def _cur(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._db.cursor()
            self._local.cur = cur
        return cur

    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self._cur().execute(sql, params or None).df()

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        """Small results as tuples (no DataFrame construction)."""
        return self._cur().execute(sql, params or None).fetchall()

    def query_arrow(self, sql: str, params: dict | None = None) -> pa.Table:
        return self._cur().sql(sql, params=params or None).to_arrow_table()

    def execute(self, sql: str, params: dict | None = None) -> None:
        self._cur().execute(sql, params or None)

    @contextmanager
    def transaction(self):
        if self.read_only:
            raise ConnectomeError(f"connectome store {self.location}: opened read-only")
        with self._write_lock:
            cur = self._cur()
            cur.execute("BEGIN TRANSACTION")
            tx = _DuckTx(cur)
            try:
                yield tx
            except BaseException:
                tx.close()
                cur.execute("ROLLBACK")
                raise
            else:
                tx.close()
                cur.execute("COMMIT")
                with _generations_lock:
                    _generations[self._key] = _generations.get(self._key, 0) + 1

    def init_schema(self) -> None:
        for stmt in schema.ddl("duckdb"):
            self._db.execute(stmt)

    def cluster(self, table: str, tx: _DuckTx | None = None) -> None:
        """Rewrite a table in its CLUSTER_ORDER so lookups on the leading column read one or two row groups
        (synapses: and rebuild their POST_COPY).

        Same rows, new physical order, one transaction — ``tx`` when given (the caller's, e.g. the one that
        commits the version), else its own; readers keep seeing the old tables until it commits."""
        if tx is None:
            with self.transaction() as own:
                return self.cluster(table, own)
        order = ", ".join(CLUSTER_ORDER[table])
        tmp = f"{table}__clustered"
        tx.execute(f"DROP TABLE IF EXISTS {tmp}")
        tx.execute(schema.create_table_sql(schema.TABLES[table], "duckdb", tmp))
        tx.execute(f"INSERT INTO {tmp} SELECT * FROM {table} ORDER BY {order}")
        tx.execute(f"DROP TABLE {table}")
        tx.execute(f"ALTER TABLE {tmp} RENAME TO {table}")
        if table == "synapses":
            tx.execute(f"DROP TABLE IF EXISTS {POST_COPY}")
            tx.execute(schema.create_table_sql(schema.SYNAPSES, "duckdb", POST_COPY))
            tx.execute(f"INSERT INTO {POST_COPY} SELECT * FROM synapses ORDER BY {', '.join(POST_ORDER)}")
            tx.execute(f"DELETE FROM store_meta WHERE key = '{POST_COPY}'")
            tx.execute(f"INSERT INTO store_meta (key, value) SELECT '{POST_COPY}', CAST(max(version) AS VARCHAR) "
                       "FROM versions")

    def close(self) -> None:
        try:
            self._db.close()
        except duckdb.Error:
            pass
