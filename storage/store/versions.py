"""Version bookkeeping: which versions exist, which can be read, starting/committing/aborting one.

Why explicit versions: a load or an edit writes its rows under a new, *pending* version number; readers only ever
read committed versions, so a half-finished load is invisible and the previous version stays intact. Commit is one
tiny transaction that flips the status.
"""

from __future__ import annotations

import datetime as _dt

import pandas as pd

from storage.errors import ConnectomeError, QueryError
from storage.store import schema


def scalar(df):
    """The single value of a one-cell result, None for NULL/NA."""
    if df.empty:
        return None
    v = df.iloc[0, 0]
    return None if pd.isna(v) else v


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def table(backend):
    return backend.query("SELECT * FROM versions ORDER BY version")


def latest_committed(backend) -> int:
    v = scalar(backend.query("SELECT max(version) AS v FROM versions WHERE status = 'committed'"))
    if v is None:
        raise QueryError(f"connectome store {backend.location}: no committed version")
    return int(v)


def pending(backend) -> list[int]:
    df = backend.query("SELECT version FROM versions WHERE status = 'pending' ORDER BY version")
    return [int(v) for v in df["version"]]


def resolve(backend, version) -> int:
    """The version a read runs at: the latest committed one, or the one asked for if it is committed."""
    if version is None:
        return latest_committed(backend)
    try:
        v = int(version)
        if isinstance(version, bool) or (isinstance(version, float) and v != version):
            raise ValueError(version)
    except (TypeError, ValueError, OverflowError):
        raise QueryError(f"version must be an integer, got {version!r}") from None
    if not 0 <= v < 2**63:
        raise QueryError(f"unknown version {v} (versions are positive integers)")
    df = backend.query("SELECT status FROM versions WHERE version = $v", {"v": v})
    if df.empty:
        known = [int(x) for x in backend.query(
            "SELECT version FROM versions WHERE status = 'committed' ORDER BY version")["version"]]
        shown = known if len(known) <= 20 else known[:5] + ["..."] + known[-5:]
        raise QueryError(f"unknown version {v} (committed versions: {shown})")
    status = df["status"].iloc[0]
    if status != "committed":
        raise QueryError(f"version {v} is {status}, not readable (only committed versions can be queried)")
    return v


def begin(tx, kind: str, description: str = "", user: str | None = None, status: str = "pending") -> int:
    """Add a version row inside an open transaction; refuses while another version is pending."""
    busy = tx.query("SELECT version FROM versions WHERE status = 'pending'")
    if not busy.empty:
        raise ConnectomeError(
            f"version {int(busy['version'].iloc[0])} is still loading (pending); commit, resume or abort it first")
    last = scalar(tx.query("SELECT max(version) AS v FROM versions"))
    last = -1 if last is None else int(last)
    parent = scalar(tx.query("SELECT max(version) AS v FROM versions WHERE status = 'committed'"))
    parent = None if parent is None else int(parent)
    new = last + 1
    t = now()
    tx.execute(
        "INSERT INTO versions (version, parent, kind, status, description, user_name, created_at, committed_at) "
        "VALUES ($v, $parent, $kind, $status, $d, $u, $t, $ct)",
        {"v": new, "parent": parent, "kind": kind, "status": status, "d": description, "u": user, "t": t,
         "ct": t if status == "committed" else None},
    )
    return new


def commit(tx, version: int) -> None:
    tx.execute("UPDATE versions SET status = 'committed', committed_at = $t WHERE version = $v AND status = 'pending'",
               {"t": now(), "v": int(version)})


def abort(tx, version: int) -> None:
    """Remove every row a pending version wrote and reopen the rows it superseded."""
    v = {"v": int(version)}
    for name in schema.WRITABLE:
        tx.execute(f"DELETE FROM {name} WHERE version_from = $v", v)
        tx.execute(f"UPDATE {name} SET version_to = NULL WHERE version_to = $v", v)
    tx.execute("DELETE FROM load_batches WHERE version = $v", v)
    tx.execute("UPDATE versions SET status = 'aborted' WHERE version = $v", v)


def status_of(backend, version: int) -> str | None:
    df = backend.query("SELECT status FROM versions WHERE version = $v", {"v": int(version)})
    return None if df.empty else str(df["status"].iloc[0])
