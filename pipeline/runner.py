"""Run a block function over a BlockGrid on Dask, resumably.

WHY futures and not dask.array/graphs: segmentation blocks write their own outputs and return small side results
(equivalences, counts); resource annotations on graphs get lost in fusion (dask#7036); and a million-block graph
would have to live in memory. Here blocks are submitted in chunks with `client.map` (one scheduler message per
chunk, deterministic keys ``{stage}-{hash}-{block_id}``), at most `max_in_flight` at a time, and collected in
batches as they finish. Finished blocks go to the stage ledger (storage/ledger.py) only after their future
completed, so a killed driver never leaves a block marked done whose write did not finish.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from distributed import Client, as_completed
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker

from pipeline.progress import Progress
from storage.box import BlockGrid
from storage.errors import ConnectomeError
from storage.ledger import Ledger, fingerprint_hash

_dashboard_printed: set[str] = set()


class BlockFailed(ConnectomeError):
    """A block raised a ConnectomeError (bad input) or kept killing its workers; names the stage and block."""


@dataclasses.dataclass(frozen=True)
class _BadInput:
    """A block function's ConnectomeError, returned by the worker instead of raised: bad input is deterministic,
    so Dask should neither retry it nor log a worker traceback for it; the driver turns it into BlockFailed."""

    message: str


def _guarded(block_fn: Callable[..., Any], block) -> Any:
    """Runs on a worker around every block (module level, so workers find it by name)."""
    try:
        return block_fn(block)
    except ConnectomeError as exc:
        return _BadInput(str(exc))


def jsonable(value: Any) -> Any:
    """Canonical JSON form of block parameters, for fingerprints (volumes by spec, arrays by value)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    spec = getattr(value, "spec", None)  # storage Volume and TensorStore handles: identified by their spec
    if spec is not None:
        spec = spec() if callable(spec) else spec
        to_json = getattr(spec, "to_json", None)
        return jsonable(to_json() if callable(to_json) else spec)
    if callable(value):
        return _function_name(value)
    return repr(value)


def _function_name(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({_function_name(fn.func)}, {json.dumps(jsonable(fn.keywords), sort_keys=True)})"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def stage_fingerprint(stage: str, grid: BlockGrid, block_fn: Callable, params: Mapping[str, Any]) -> dict:
    """What a stage's output depends on: the block layout, the block function and its parameters (incl. inputs)."""
    return {"stage": stage, "grid": grid.to_json(), "block_fn": _function_name(block_fn), "params": jsonable(params)}


def _default_window(client: Client) -> int:
    """Enough queued blocks to keep every thread busy between driver batches, small enough to stay cheap."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler without workers yet still works with the floor
        threads = 0
    return max(256, 32 * threads)


def _import_function(module: str, qualname: str) -> None:
    """Runs on a worker: can it find the block function by name (how Dask unpickles it)?"""
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)


def _check_importable_on_workers(client: Client, block_fn: Callable, stage: str) -> None:
    """Fail fast with one line instead of hanging: a worker that cannot unpickle a task never reports it."""
    fn = block_fn.func if isinstance(block_fn, functools.partial) else block_fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return  # pickled by value (cloudpickle), nothing to import
    try:
        client.run(_import_function, module, qualname)
    except OSError:
        return  # a worker died or restarted during the check (CommClosedError): the check is a nicety, go on
    except (ImportError, AttributeError) as exc:
        raise BlockFailed(f"stage '{stage}': block function {module}.{qualname} cannot be imported on the Dask "
                          f"workers ({exc}); install the package on the workers or put its folder on PYTHONPATH "
                          f"there") from None


def _dashboard_served(link: str) -> bool:
    """False only when the scheduler answers 404 (its HTTP server runs, the dashboard is switched off).

    Asks for the dashboard's root, which redirects to /status when the dashboard exists (cheap: rendering
    /status itself takes seconds on a busy machine).
    """
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(link)
    root = url.path.rsplit("/", 1)[0] + "/"
    try:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
        try:
            conn.request("HEAD", root)
            return conn.getresponse().status != 404
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - unreachable from here (remote cluster, https): still worth printing
        return True


def _print_dashboard_once(client: Client, stage: str) -> None:
    try:
        link = client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else None
    except Exception:  # noqa: BLE001 - a link is a nicety, never a reason to fail
        link = None
    if link and link not in _dashboard_printed and _dashboard_served(link):
        _dashboard_printed.add(link)
        print(f"[{stage}] Dask dashboard: {link}", file=sys.stderr, flush=True)


def run_blockwise(
    stage: str,
    grid: BlockGrid,
    block_fn: Callable[..., Any],
    *,
    params: dict,
    client: Client,
    ledger_dir: str | Path,
    resources: dict | None = None,
    max_in_flight: int | None = None,
    retries: int = 3,
    restart: bool = False,
    progress: bool | Callable[[int, int], None] = True,
    chunk_size: int | None = None,
    ledger_flush_seconds: float = 2.0,
    collect_seconds: float = 0.05,
) -> dict[int, object]:
    """Call ``block_fn(block, **params)`` for every block of `grid` on Dask workers; return {block_id: result}.

    Finished blocks (and their results) are kept in the stage ledger under `ledger_dir`; a rerun skips them and
    returns their stored results. A ledger written for another grid/function/parameters raises LedgerError unless
    `restart` is true (then it is discarded). `resources` (e.g. {"GPU": 1}) restricts blocks to workers that
    advertise them. `retries` re-runs a block after an exception; a block whose worker dies is rescheduled by
    Dask. `progress` is True (text on stderr), False (silent) or a callable getting (done, total).
    Finished blocks are collected at most every `collect_seconds` so that a run of tiny blocks costs one
    gather and one submission per batch instead of per block (keeps the scheduler free for the workers).
    `block_fn` must be a module-level function that opens its stores from specs in `params`, writes only its
    write box, and is deterministic.
    """
    params = dict(params)
    fingerprint = stage_fingerprint(stage, grid, block_fn, params)
    key_prefix = f"{stage}-{fingerprint_hash(fingerprint)[:12]}"
    total = grid.num_blocks
    show = progress is True
    callback = progress if callable(progress) else None

    with Ledger.open(ledger_dir, stage, fingerprint, total, restart=restart,
                     flush_seconds=ledger_flush_seconds) as ledger:
        already = ledger.done_count
        report = Progress(stage, total, already, enabled=show, callback=callback)
        if already == total:
            report.message(f"all {total} blocks already done (ledger {ledger.directory})")
            return dict(ledger.results)
        if show:
            _print_dashboard_once(client, stage)
        report.message(f"{total} blocks, {already} done in ledger, {total - already} to run")

        _check_importable_on_workers(client, block_fn, stage)
        window = max(1, int(max_in_flight or _default_window(client)))
        chunk = max(1, int(chunk_size or min(1000, max(1, window // 4))))
        fn = functools.partial(_guarded, functools.partial(block_fn, **params) if params else block_fn)
        stream = _BlockStream(client, stage, grid, fn, key_prefix, _iter_ids(ledger), window=window, chunk=chunk,
                              retries=retries, resources=resources)
        try:
            stream.submit_more()
            while stream.pending:
                ids, values = stream.collect(collect_seconds)
                ledger.add(ids, values)
                report.update(len(ids))
                if stream.failure is not None:
                    raise BlockFailed(stream.failure)
                stream.submit_more()
        except BaseException:
            stream.cancel_all()
            raise
        finally:
            ledger.flush()
        report.finish()
        return dict(ledger.results)


class _BlockStream:
    """Blocks in flight: submitted in chunks up to `window`, collected in batches, lost ones resubmitted.

    A finished future can lose its result when its worker dies before the driver gathered it; Dask then
    recomputes or cancels it. Such blocks are released and resubmitted under the same key (idempotent, since
    block functions are deterministic), at most `retries + 3` times each.
    """

    def __init__(self, client: Client, stage: str, grid: BlockGrid, fn: Callable, key_prefix: str, todo,
                 *, window: int, chunk: int, retries: int, resources: dict | None) -> None:
        self.client, self.stage, self.grid, self.fn = client, stage, grid, fn
        self.key_prefix, self.todo = key_prefix, todo
        self.window, self.chunk, self.retries, self.resources = window, chunk, retries, resources
        self.pending: dict[str, int] = {}  # future key -> block id (at most `window` entries)
        self.live: dict[str, Any] = {}  # future key -> Future (cancelled if the run stops early)
        self.again: list[int] = []  # lost blocks to resubmit first
        self.resubmits: dict[int, int] = {}
        self.futures = as_completed(loop=client.loop)
        self.failure: str | None = None  # the first block that reported bad input (ConnectomeError)

    def submit_more(self) -> None:
        while len(self.pending) < self.window:
            room = min(self.chunk, self.window - len(self.pending))
            ids, self.again = self.again[:room], self.again[room:]
            if len(ids) < room:
                ids += _take(self.todo, room - len(ids))
            if not ids:
                return
            keys = [f"{self.key_prefix}-{i}" for i in ids]
            blocks = [self.grid.block(i) for i in ids]
            new = self.client.map(self.fn, blocks, key=keys, retries=self.retries, resources=self.resources,
                                  pure=False)
            self.pending.update(zip(keys, ids))
            self.live.update(zip(keys, new))
            self.futures.update(new)

    def collect(self, collect_seconds: float) -> tuple[list[int], list[Any]]:
        """Wait for finished blocks (at least one, more for up to `collect_seconds`); return their ids, results."""
        batch = self.futures.next_batch(block=True)
        if collect_seconds > 0 and not self.futures.is_empty():
            time.sleep(collect_seconds)
            batch += self.futures.next_batch(block=False)
        finished, lost = [], []
        for f in batch:
            if f.status == "finished":
                finished.append(f)
            elif f.status == "error":
                _raise_block_failure(self.stage, self.grid, f, self.pending)
            else:
                lost.append(f)
        del batch
        values = self._gather(finished, lost)
        ids = [self.pending.pop(f.key) for f in finished]
        for f in finished:
            del self.live[f.key]
        bad = [i for i, v in enumerate(values) if isinstance(v, _BadInput)]
        if bad:
            if self.failure is None:
                block_id = ids[bad[0]]
                self.failure = (f"stage '{self.stage}' block {block_id} {self.grid.block(block_id).write}: "
                                f"{values[bad[0]].message}")
            keep = [i for i in range(len(ids)) if i not in set(bad)]
            ids, values = [ids[i] for i in keep], [values[i] for i in keep]
        if lost:
            self._requeue(lost)
        return ids, values

    def _gather(self, finished: list, lost: list) -> list[Any]:
        # The scheduler reports each result's type; a block that returned None needs no round trip to fetch it
        # (most writing stages return None or tiny metadata, so this halves the driver's traffic for them).
        remote = [i for i, f in enumerate(finished) if f.type is not type(None)]
        if not remote:
            return [None] * len(finished)
        try:
            fetched = self.client.gather([finished[i] for i in remote])
            values: list[Any] = [None] * len(finished)
            for i, v in zip(remote, fetched):
                values[i] = v
            return values
        except Exception:  # noqa: BLE001 - a result vanished between completion and gather; sort them out
            values, kept = [], []
            for f in finished:
                try:
                    values.append(f.result())
                    kept.append(f)
                except FutureCancelledError:
                    lost.append(f)
                except Exception:  # noqa: BLE001
                    _raise_block_failure(self.stage, self.grid, f, self.pending)
            finished[:] = kept
            return values

    def _requeue(self, lost: list) -> None:
        for f in lost:
            block_id = self.pending.pop(f.key)
            del self.live[f.key]
            self.resubmits[block_id] = self.resubmits.get(block_id, 0) + 1
            if self.resubmits[block_id] > self.retries + 3:
                raise BlockFailed(f"stage '{self.stage}' block {block_id} {self.grid.block(block_id).write}: "
                                  f"its result was lost {self.resubmits[block_id]} times (workers dying?)")
            self.again.append(block_id)
        lost.clear()  # drop the last references so the keys are released before they are resubmitted

    def cancel_all(self) -> None:
        if self.live:
            self.client.cancel(list(self.live.values()))
            self.live.clear()


def _iter_ids(ledger: Ledger):
    for ids in ledger.todo_chunks():
        yield from ids.tolist()


def _take(iterator, n: int) -> list[int]:
    out = []
    for value in iterator:
        out.append(value)
        if len(out) >= n:
            break
    return out


def _raise_block_failure(stage: str, grid: BlockGrid, future, pending: Mapping[str, int]) -> None:
    block_id = pending.get(future.key, -1)
    where = f"stage '{stage}' block {block_id}"
    if block_id >= 0:
        where += f" {grid.block(block_id).write}"
    try:
        exc = future.exception()
    except FutureCancelledError:
        raise BlockFailed(f"{where}: the task was cancelled (scheduler or client shut down?)") from None
    if isinstance(exc, KilledWorker):
        raise BlockFailed(f"{where}: its worker died repeatedly (out of memory or crashed?); "
                          f"see the worker logs on the Dask dashboard") from None
    if isinstance(exc, ConnectomeError):
        raise BlockFailed(f"{where}: {exc}") from exc
    tb = future.traceback()
    if exc is None:
        raise RuntimeError(f"{where}: future ended in state {future.status!r}")
    exc.add_note(f"while running {where}")
    raise exc.with_traceback(tb)
