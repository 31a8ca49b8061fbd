"""Bring a store made by an older schema up to this one, in place and in one transaction.

Why in place: a connectome store holds months of proofreading history; a release that adds a column must not ask
for a reload. Schema changes only ever add nullable columns (``schema.missing_columns_sql`` refuses anything
else), so an upgrade is a few ``ALTER TABLE ... ADD COLUMN`` and old rows read NULL there.
"""

from __future__ import annotations

from storage.store import schema


def stored_version(tx) -> int:
    meta = tx.query("SELECT value FROM store_meta WHERE key = 'schema_version'")
    return int(meta["value"].iloc[0]) if len(meta) else 0


def record_version(tx) -> None:
    """Mark the store as holding this schema (after an upgrade or an import)."""
    tx.execute("UPDATE store_meta SET value = $s WHERE key = 'schema_version'", {"s": str(schema.SCHEMA_VERSION)})


def upgrade(backend) -> int | None:
    """Upgrade to ``schema.SCHEMA_VERSION`` if the store is older; returns the version upgraded from, or None."""
    with backend.transaction() as tx:
        old = stored_version(tx)
        if old >= schema.SCHEMA_VERSION:
            return None
        cols = tx.query("SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema()")
        existing: dict[str, set[str]] = {}
        for t, c in zip(cols["table_name"], cols["column_name"]):
            existing.setdefault(str(t), set()).add(str(c))
        for stmt in schema.missing_columns_sql(backend.dialect, existing):
            tx.execute(stmt)
        record_version(tx)
    return old
