"""The block ledger: which blocks of a stage are finished, their small results, and what run they belong to.

WHY this shape:
- Resume must be cheap at scale (a million blocks checked in well under a second), so finished blocks live in one
  append-only binary log: each record is ``header | block ids (uint64) | pickled results``, with a CRC. Reading it
  is a handful of large reads; the done set becomes a numpy bitmap.
- Durability without per-block cost: the driver buffers finished blocks and appends one record per batch
  (fsync per record). A driver killed between batches loses only "done" marks, never gains false ones: a block is
  buffered only after its future completed (its writes finished), and a torn last record fails its length/CRC
  check and is cut off on the next open. Losing marks just means those blocks run again, which is safe because
  block functions are deterministic.
- A ledger belongs to one run layout: the manifest stores a fingerprint (grid, block function, parameters) and
  its hash. Resuming with a different fingerprint is refused with a message naming what differs, because mixing
  blocks computed with different parameters silently corrupts the output.
- Only the driver writes; an exclusive lock file stops two drivers from appending to the same ledger.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from storage.errors import LedgerError

FORMAT = "connectome-block-ledger/1"
MANIFEST = "ledger.json"
LOG = "blocks.log"
LOCK = "lock"
_MAGIC = b"BLK1"
_HEADER = struct.Struct("<4sIQI")  # magic, number of blocks, payload bytes, crc32(ids + payload)


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """Stable sha256 of a JSON-able fingerprint (canonical JSON: sorted keys, no whitespace)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_differences(old: Any, new: Any, path: str = "", limit: int = 3) -> list[str]:
    """Human-readable list of what differs between two JSON-like fingerprints (at most `limit` items)."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                name = f"{where}.{key}" if where else str(key)
                if key not in a:
                    out.append(f"{name} added ({_short(b[key])})")
                elif key not in b:
                    out.append(f"{name} removed (was {_short(a[key])})")
                else:
                    walk(a[key], b[key], name)
                if len(out) >= limit:
                    return
            return
        out.append(f"{where or 'value'} was {_short(a)}, now {_short(b)}")

    walk(old, new, path)
    return out


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _scan(data: bytes | memoryview) -> tuple[list[tuple[np.ndarray, int, int]], int]:
    """Parse log records; return [(ids, payload_start, payload_len)] and the byte length of the valid prefix."""
    records = []
    pos, end = 0, len(data)
    while pos + _HEADER.size <= end:
        magic, n, payload_len, crc = _HEADER.unpack_from(data, pos)
        body = pos + _HEADER.size
        stop = body + 8 * n + payload_len
        if magic != _MAGIC or stop > end or zlib.crc32(data[body:stop]) != crc:
            break  # torn or foreign tail: everything from here is discarded
        ids = np.frombuffer(data, dtype="<u8", count=n, offset=body)
        records.append((ids, body + 8 * n, payload_len))
        pos = stop
    return records, pos


class Ledger:
    """Finished blocks of one stage. Open with `Ledger.open`; use as a context manager (flushes and unlocks)."""

    def __init__(self, directory: Path, stage: str, fingerprint: dict, num_blocks: int, *,
                 flush_every: int = 2000, flush_seconds: float = 2.0) -> None:
        self.directory = directory
        self.stage = stage
        self.fingerprint = fingerprint
        self.hash = fingerprint_hash(fingerprint)
        self.num_blocks = num_blocks
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self._pending_ids: list[int] = []
        self._pending_results: list[Any] = []
        self._last_flush = time.monotonic()
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._done: np.ndarray | None = None
        self._results: dict[int, Any] | None = None

    # --- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, ledger_dir: str | Path, stage: str, fingerprint: dict, num_blocks: int, *,
             restart: bool = False, **kwargs: Any) -> "Ledger":
        """Open (or create) the ledger of `stage` under `ledger_dir`.

        Raises LedgerError when an existing ledger was written for a different fingerprint, unless `restart`
        is true, in which case the old ledger is discarded.
        """
        if not stage or not all(c.isalnum() or c in "-_." for c in stage) or stage.startswith("."):
            raise LedgerError(f"stage name {stage!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
        directory = Path(ledger_dir) / stage
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"stage '{stage}': cannot create ledger folder {directory}: {exc.strerror}") from None
        ledger = cls(directory, stage, fingerprint, num_blocks, **kwargs)
        ledger._lock()
        try:
            ledger._check_or_reset(restart)
            ledger._open_log()
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LedgerError(f"stage '{self.stage}': ledger {self.directory} is in use by another run "
                              f"(pid {holder}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _check_or_reset(self, restart: bool) -> None:
        manifest_path = self.directory / MANIFEST
        if restart:
            for name in (LOG, MANIFEST):
                (self.directory / name).unlink(missing_ok=True)
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
                old_hash, old_fp = manifest["hash"], manifest["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LedgerError(f"stage '{self.stage}': ledger manifest {manifest_path} is unreadable ({exc}); "
                                  f"rerun with --restart to discard it") from None
            if old_hash != self.hash:
                diffs = describe_differences(old_fp, json.loads(json.dumps(self.fingerprint, default=str)))
                what = "; ".join(diffs) or "fingerprint hash"
                raise LedgerError(f"stage '{self.stage}': ledger {self.directory} belongs to a different run "
                                  f"({what}); rerun with --restart (restart=True) to discard it")
            return
        (self.directory / LOG).unlink(missing_ok=True)  # a log without manifest is an unfinished creation
        manifest = {"format": FORMAT, "stage": self.stage, "hash": self.hash, "num_blocks": self.num_blocks,
                    "fingerprint": self.fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())

    def _open_log(self) -> None:
        path = self.directory / LOG
        data = path.read_bytes() if path.exists() else b""
        records, valid = _scan(data)
        done = np.zeros(self.num_blocks, dtype=bool)
        results: dict[int, Any] = {}
        for ids, start, length in records:
            if ids.size and int(ids.max()) >= self.num_blocks:
                raise LedgerError(f"stage '{self.stage}': ledger {path} names block {int(ids.max())} but the grid "
                                  f"has {self.num_blocks} blocks; rerun with --restart to discard it")
            done[ids] = True
            values = pickle.loads(data[start:start + length]) if length else [None] * ids.size
            results.update(zip(ids.tolist(), values))
        self._done, self._results = done, results
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        if valid < len(data):
            os.ftruncate(fd, valid)  # drop a torn tail left by a killed driver
            os.fsync(fd)
        os.lseek(fd, valid, os.SEEK_SET)
        self._log_fd = fd

    # --- reading ------------------------------------------------------------------------------
    @property
    def done_mask(self) -> np.ndarray:
        """Bool array over block ids: True where the block is recorded finished (including unflushed ones)."""
        assert self._done is not None
        return self._done

    @property
    def done_count(self) -> int:
        return int(self.done_mask.sum())

    @property
    def results(self) -> dict[int, Any]:
        """{block_id: result} of every finished block (live view; do not modify)."""
        assert self._results is not None
        return self._results

    def todo_chunks(self, chunk: int = 65536) -> Iterable[np.ndarray]:
        """Ids of unfinished blocks in ascending order, a chunk at a time (never the full list at once)."""
        done = self.done_mask
        for start in range(0, self.num_blocks, chunk):
            ids = np.flatnonzero(~done[start:start + chunk])
            if ids.size:
                yield ids + start

    # --- writing ------------------------------------------------------------------------------
    def add(self, block_ids: Sequence[int], results: Sequence[Any]) -> None:
        """Record finished blocks (call only after their work completed). Flushes in batches."""
        assert self._done is not None and self._results is not None
        self._pending_ids.extend(block_ids)
        self._pending_results.extend(results)
        self._done[list(block_ids)] = True
        self._results.update(zip(block_ids, results))
        if (len(self._pending_ids) >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Append buffered blocks as one durable record."""
        self._last_flush = time.monotonic()
        if not self._pending_ids or self._log_fd is None:
            return
        ids = np.asarray(self._pending_ids, dtype="<u8").tobytes()
        payload = b"" if all(r is None for r in self._pending_results) else pickle.dumps(
            self._pending_results, protocol=pickle.HIGHEST_PROTOCOL)
        body = ids + payload
        record = _HEADER.pack(_MAGIC, len(self._pending_ids), len(payload), zlib.crc32(body)) + body
        view = memoryview(record)
        while view:
            written = os.write(self._log_fd, view)
            view = view[written:]
        os.fsync(self._log_fd)
        self._pending_ids, self._pending_results = [], []

    def close(self) -> None:
        try:
            if self._log_fd is not None:
                self.flush()
        finally:
            for attr in ("_log_fd", "_lock_fd"):
                fd = getattr(self, attr)
                if fd is not None:
                    os.close(fd)  # closing the lock fd releases the flock
                    setattr(self, attr, None)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_done_count(ledger_dir: str | Path, stage: str) -> int:
    """Number of blocks durably recorded as finished (reads the log only; safe while a driver appends)."""
    path = Path(ledger_dir) / stage / LOG
    if not path.exists():
        return 0
    records, _ = _scan(path.read_bytes())
    if not records:
        return 0
    return int(np.unique(np.concatenate([ids for ids, _, _ in records])).size)


def remove_ledger(ledger_dir: str | Path, stage: str) -> None:
    """Delete a stage's ledger folder (e.g. after its output was deleted)."""
    shutil.rmtree(Path(ledger_dir) / stage, ignore_errors=True)
