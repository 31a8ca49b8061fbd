"""Test access to the throw-away PostgreSQL server (the implementation lives in storage/store/local_postgres.py)."""

from storage.store.local_postgres import PostgresServer, find_bin

__all__ = ["PostgresServer", "find_bin"]
