"""The connectome store: schema, DuckDB/PostgreSQL backends, writers, query API, proofreading edits.

``Connectome`` (queries, edits) and ``ConnectomeStore`` (writers, versions, Parquet) are imported lazily so that
``import storage`` stays light.
"""

from __future__ import annotations

__all__ = ["Connectome", "ConnectomeStore", "EditResult", "TABLES"]


def __getattr__(name: str):
    if name == "Connectome":
        from storage.store.connectome import Connectome

        return Connectome
    if name == "ConnectomeStore":
        from storage.store.writer import ConnectomeStore

        return ConnectomeStore
    if name == "EditResult":
        from storage.store.edits import EditResult

        return EditResult
    if name == "TABLES":
        from storage.store.schema import TABLES

        return TABLES
    raise AttributeError(f"module 'storage.store' has no attribute {name!r}")
