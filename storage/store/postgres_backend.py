"""PostgreSQL backend: the same store on a server, through psycopg 3.

Why per-thread connections: a psycopg connection runs one transaction at a time; giving each thread its own lets
readers query committed data while a writer's batch transaction is open (READ COMMITTED + version filters keep
each answer at one version). A connection that drops (server restart, ``pg_terminate_backend``) is discarded and
reopened on next use; the writer retries the batch, which is safe because a batch is one transaction.
"""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from storage.errors import ConnectomeError
from storage.store import schema
from storage.store.backend import ConnectionLost
from storage.store.sql import to_psycopg


def _psycopg():
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the install
        raise ConnectomeError("PostgreSQL store needs psycopg 3: pip install 'connectome-pipeline[postgres]'") from None
    return psycopg


def _frame(cur) -> pd.DataFrame:
    cols = [d.name for d in cur.description] if cur.description else []
    return pd.DataFrame.from_records(cur.fetchall(), columns=cols)


def _copy_arrow(cur, table: str, data: pa.Table) -> None:
    cols = ", ".join(data.column_names)
    list_cols = [i for i, f in enumerate(data.schema) if pa.types.is_list(f.type)]
    if list_cols:  # arrays do not survive CSV; row by row is fine for the (small) embedding tables
        with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in data.to_pylist():
                copy.write_row(list(row.values()))
        return
    buf = io.BytesIO()
    pacsv.write_csv(data, buf, pacsv.WriteOptions(include_header=False, quoting_style="all_valid"))
    with cur.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT csv)") as copy:
        view = buf.getbuffer()
        step = 1 << 22
        for start in range(0, len(view), step):
            copy.write(view[start:start + step])


class _PgTx:
    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params: dict | None = None) -> None:
        self.conn.execute(to_psycopg(sql) if params else sql.replace("%", "%%"), params or None)

    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        with self.conn.cursor() as cur:
            cur.execute(to_psycopg(sql) if params else sql.replace("%", "%%"), params or None)
            return _frame(cur)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        with self.conn.cursor() as cur:
            _copy_arrow(cur, table, data)

    def stage(self, name: str, like: str, data: pa.Table) -> str:
        self.conn.execute(f"CREATE TEMP TABLE {name} (LIKE {like}) ON COMMIT DROP")
        self.insert_arrow(name, data)
        self.conn.execute(f"ANALYZE {name}")  # without statistics the planner picks nested loops over it
        return name


class PostgresBackend:
    dialect = "postgres"

    def __init__(self, url: str, *, read_only: bool = False):
        self.location = url
        self.read_only = read_only
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._all: list = []  # every thread's connection, so close() closes them all
        self._conn()  # fail early with a clear message

    def _conn(self):
        psycopg = _psycopg()
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            conn = psycopg.connect(self.location, autocommit=True)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConnectomeError(f"connectome store {self._safe_location()}: cannot connect ({first})") from None
        self._local.conn = conn
        self._all.append(conn)
        return conn

    def _safe_location(self) -> str:
        """The URL without a password, for messages."""
        import re

        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.location)

    def _run(self, fn, *, read: bool = False):
        """Runs one autocommit statement. A read whose connection was dropped (server restart, idle kill,
        failover) is retried once on a fresh connection, since rereading is harmless; a write is not, since it
        may have committed before the connection went."""
        psycopg = _psycopg()
        try:
            return fn(self._conn())
        except psycopg.OperationalError as exc:
            self._drop()
            if read:
                return self._run(fn)
            raise ConnectionLost(f"connectome store {self._safe_location()}: connection lost ({str(exc).strip().splitlines()[0] if str(exc).strip() else 'closed'})") from exc

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self._run(lambda conn: _PgTx(conn).query(sql, params), read=True)

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        """Small results as tuples (no DataFrame construction)."""
        def run(conn):
            with conn.cursor() as cur:
                cur.execute(to_psycopg(sql) if params else sql.replace("%", "%%"), params or None)
                return cur.fetchall()

        return self._run(run, read=True)

    def query_arrow(self, sql: str, params: dict | None = None) -> pa.Table:
        return pa.Table.from_pandas(self.query(sql, params), preserve_index=False)

    def execute(self, sql: str, params: dict | None = None) -> None:
        self._run(lambda conn: _PgTx(conn).execute(sql, params))

    def copy_out_csv(self, sql: str) -> bytes:
        """A query's rows as CSV with header (fast bulk export)."""
        def run(conn):
            buf = io.BytesIO()
            with conn.cursor() as cur:
                with cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT csv, HEADER true)") as copy:
                    for chunk in copy:
                        buf.write(chunk)
            return buf.getvalue()

        return self._run(run, read=True)

    @contextmanager
    def transaction(self):
        if self.read_only:
            raise ConnectomeError(f"connectome store {self._safe_location()}: opened read-only")
        psycopg = _psycopg()
        with self._write_lock:
            conn = self._conn()
            try:
                with conn.transaction():
                    # one writer at a time across processes (as DuckDB has it): version numbers and edits read
                    # the current state and then change it, which must not interleave
                    conn.execute("SELECT pg_advisory_xact_lock(7242001)")
                    yield _PgTx(conn)
            except psycopg.OperationalError as exc:
                self._drop()
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "closed"
                raise ConnectionLost(f"connectome store {self._safe_location()}: connection lost ({msg})") from exc
            except psycopg.Error as exc:
                if conn.broken or conn.closed:
                    self._drop()
                    raise ConnectionLost(f"connectome store {self._safe_location()}: connection lost ({exc})") from exc
                raise

    def init_schema(self) -> None:
        with self.transaction() as tx:
            for stmt in schema.ddl("postgres") + schema.index_ddl("postgres"):
                tx.execute(stmt)

    def backend_pid(self) -> int:
        return int(self._conn().info.backend_pid)

    def close(self) -> None:
        self._drop()
        for conn in self._all:
            try:
                conn.close()
            except Exception:
                pass
        self._all.clear()
