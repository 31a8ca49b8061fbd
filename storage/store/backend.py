"""What the store needs from a database, and how a URL or path picks one.

Both backends offer the same small surface (``query``, ``query_arrow``, ``execute``, ``transaction`` yielding a
``Tx`` with ``insert_arrow``/``stage``) so the query and writer layers hold no backend-specific code beyond the
dialect strings in `sql.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

from storage.errors import ConnectomeError


class ConnectionLost(ConnectomeError):
    """The database connection dropped during a transaction (nothing of it was committed; safe to retry)."""


class Tx(Protocol):
    def execute(self, sql: str, params: dict | None = None) -> None: ...
    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame: ...
    def insert_arrow(self, table: str, data: pa.Table) -> None: ...
    def stage(self, name: str, like: str, data: pa.Table) -> str: ...


class Backend(Protocol):
    dialect: str
    read_only: bool
    location: str

    def query(self, sql: str, params: dict | None = None) -> pd.DataFrame: ...
    def query_arrow(self, sql: str, params: dict | None = None) -> pa.Table: ...
    def execute(self, sql: str, params: dict | None = None) -> None: ...
    def transaction(self): ...
    def init_schema(self) -> None: ...
    def close(self) -> None: ...


def is_postgres_url(location: str) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_backend(location: str | Path, *, create: bool = False, read_only: bool = False, threads: int | None = None):
    """A backend for a DuckDB file path, a ``postgresql://`` URL or a Parquet release directory."""
    loc = str(location)
    if is_postgres_url(loc):
        from storage.store.postgres_backend import PostgresBackend

        return PostgresBackend(loc, read_only=read_only)
    path = Path(loc)
    from storage.store.duckdb_backend import DuckDBBackend

    if path.is_dir():
        if create:
            raise ConnectomeError(f"connectome store {path}: is a directory; give a .duckdb file path to create a store")
        if not (path / "manifest.json").is_file():
            raise ConnectomeError(f"connectome store {path}: directory without manifest.json (not a Parquet release)")
        return DuckDBBackend.over_parquet(path, threads=threads)
    if not create and not path.is_file():
        raise ConnectomeError(f"connectome store {path}: no such file (create it with ConnectomeStore.create)")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return DuckDBBackend(path, read_only=read_only, threads=threads)
