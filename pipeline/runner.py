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
from storage.box import Block, BlockGrid
from storage.errors import ConnectomeError
from storage.ledger import Ledger, fingerprint_hash

_dashboard_printed: set[str] = set()


class BlockFailed(ConnectomeError):
    """A block raised a ConnectomeError (bad input) or kept killing its workers; names the stage and block."""


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


def _print_dashboard_once(client: Client, stage: str) -> None:
    link = getattr(client, "dashboard_link", None)
    if link and link not in _dashboard_printed:
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

        window = max(1, int(max_in_flight or _default_window(client)))
        chunk = max(1, int(chunk_size or min(1000, max(1, window // 4))))
        fn = functools.partial(block_fn, **params) if params else block_fn
        todo = _iter_ids(ledger)
        pending: dict[str, int] = {}  # future key -> block id (at most `window` entries)
        live: dict[str, Any] = {}  # future key -> Future, to cancel them if the run stops early
        futures = as_completed(loop=client.loop)

        def submit_more() -> None:
            while len(pending) < window:
                ids = _take(todo, min(chunk, window - len(pending)))
                if not ids:
                    return
                keys = [f"{key_prefix}-{i}" for i in ids]
                blocks = [grid.block(i) for i in ids]
                new = client.map(fn, blocks, key=keys, retries=retries, resources=resources, pure=False)
                pending.update(zip(keys, ids))
                live.update(zip(keys, new))
                futures.update(new)

        try:
            submit_more()
            while pending:
                batch = _next_batch(futures, collect_seconds)
                finished = [f for f in batch if f.status == "finished"]
                failed = [f for f in batch if f.status != "finished"]
                if failed:
                    _raise_block_failure(stage, grid, failed[0], pending)
                values = client.gather(finished) if finished else []
                ids = []
                for f in finished:
                    ids.append(pending.pop(f.key))
                    del live[f.key]
                ledger.add(ids, values)
                report.update(len(ids))
                submit_more()
        except BaseException:
            if live:
                client.cancel(list(live.values()))
            raise
        finally:
            ledger.flush()
        report.finish()
        return dict(ledger.results)


def _next_batch(futures: as_completed, collect_seconds: float) -> list:
    """Wait for at least one finished future, then let more finish for up to `collect_seconds`."""
    batch = futures.next_batch(block=True)
    if collect_seconds > 0 and not futures.is_empty():
        time.sleep(collect_seconds)
        batch += futures.next_batch(block=False)
    return batch


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
