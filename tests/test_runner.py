"""The blockwise runner on a real Dask LocalCluster writing a real TensorStore zarr3 volume.

One cluster for the module (2 worker processes, one labelled GPU=1), reused by every test.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

import runner_blocks as rb
from pipeline.cluster import ClusterConfig, open_client
from pipeline.progress import Progress
from pipeline.runner import BlockFailed, run_blockwise
from storage.box import Box, BlockGrid
from storage.errors import LedgerError
from storage.ledger import Ledger, read_done_count

SEED = 7


@pytest.fixture(scope="module")
def client():
    config = ClusterConfig(workers=2, threads_per_worker=1, gpu_workers=1, dashboard=True,
                           dashboard_address=":0", memory_limit="2GiB")
    with open_client(config) as c:
        yield c


@pytest.fixture(scope="module")
def reference(client, tmp_path_factory):
    """An uninterrupted run: the bytes every other run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    spec = rb.create_volume(root / "out.zarr")
    calls = root / "calls"
    calls.mkdir()
    results = run_blockwise("write", rb.grid(), rb.write_block, params={"spec": spec, "seed": SEED,
                            "calls_dir": str(calls)}, client=client, ledger_dir=root / "ledger", progress=False)
    return {"root": root, "spec": spec, "results": results, "calls": calls}


def read_volume(spec: dict) -> np.ndarray:
    return ts.open(spec, open=True).result().read().result()


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def workers_by_name(client) -> dict[str, str]:
    return {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}


def test_thousand_blocks_write_the_expected_volume_and_results(reference):
    assert rb.grid().num_blocks == 1000
    expected = rb.expected_volume(SEED)
    np.testing.assert_array_equal(read_volume(reference["spec"]), expected)
    results = reference["results"]
    assert sorted(results) == list(range(1000))
    for block in (rb.grid().block(i) for i in (0, 517, 999)):
        assert results[block.block_id]["sum"] == int(expected[block.write.slices].sum(dtype=np.uint64))
    assert len(list(reference["calls"].iterdir())) == 1000  # every block ran exactly once


def test_rerun_skips_finished_blocks_and_returns_stored_results(client, reference):
    before = len(list(reference["calls"].iterdir()))
    results = run_blockwise("write", rb.grid(), rb.write_block, params={"spec": reference["spec"], "seed": SEED,
                            "calls_dir": str(reference["calls"])}, client=client,
                            ledger_dir=reference["root"] / "ledger", progress=False)
    assert len(list(reference["calls"].iterdir())) == before  # nothing ran again
    assert results == reference["results"]


def test_worker_killed_mid_run_gives_identical_output(client, reference, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    victim = workers_by_name(client)["cpu-0"]
    pid = client.run(os.getpid, workers=[victim])[victim]
    killed_at = []

    def kill_once(done: int, total: int) -> None:
        if not killed_at and done >= 150:
            killed_at.append(done)
            os.kill(pid, signal.SIGKILL)

    results = run_blockwise("write", rb.grid(), rb.write_block, params={"spec": spec, "seed": SEED, "sleep": 0.002},
                            client=client, ledger_dir=tmp_path / "ledger", progress=kill_once, max_in_flight=64)
    assert killed_at and killed_at[0] < 1000  # the worker died while blocks were still running
    assert len(results) == 1000
    assert tree_bytes(tmp_path / "out.zarr") == tree_bytes(reference["root"] / "out.zarr")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it; later tests need both workers
    assert pid not in client.run(os.getpid).values()


def test_driver_killed_mid_run_reruns_only_unfinished_blocks(client, reference, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    calls = tmp_path / "calls"
    calls.mkdir()
    ledger_dir = tmp_path / "ledger"
    params = {"spec": spec, "seed": SEED, "sleep": 0.004, "calls_dir": str(calls)}
    settings = {"address": client.scheduler.address, "params": params, "ledger_dir": str(ledger_dir)}
    driver = subprocess.Popen([sys.executable, rb.__file__, json.dumps(settings)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while read_done_count(ledger_dir, "write") < 100:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "driver made no progress"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    _wait_until_idle(client)  # blocks the dead driver had running finish (and are forgotten) before counting

    done_before = read_done_count(ledger_dir, "write")
    assert 100 <= done_before < 1000
    calls_before = len(list(calls.iterdir()))
    results = run_blockwise("write", rb.grid(), rb.write_block, params=params, client=client,
                            ledger_dir=ledger_dir, progress=False)
    rerun = len(list(calls.iterdir())) - calls_before
    assert rerun == 1000 - done_before  # exactly the unfinished blocks ran again
    assert len(results) == 1000
    assert all(results[i]["sum"] == reference["results"][i]["sum"] for i in range(1000))
    assert tree_bytes(tmp_path / "out.zarr") == tree_bytes(reference["root"] / "out.zarr")


def _wait_until_idle(client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0:
            time.sleep(0.3)  # a task released while already running still finishes its (identical) write
            return
        time.sleep(0.05)
    raise AssertionError("scheduler still has tasks of the killed driver")


def small_grid() -> BlockGrid:
    return BlockGrid(Box.from_shape((4, 8, 8)), rb.BLOCK_SHAPE, alignment=rb.BLOCK_SHAPE)


def test_changed_parameter_with_old_ledger_is_refused(client, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    ledger_dir = tmp_path / "ledger"
    run_blockwise("write", small_grid(), rb.write_block, params={"spec": spec, "seed": 1}, client=client,
                  ledger_dir=ledger_dir, progress=False)
    with pytest.raises(LedgerError) as err:
        run_blockwise("write", small_grid(), rb.write_block, params={"spec": spec, "seed": 2}, client=client,
                      ledger_dir=ledger_dir, progress=False)
    message = str(err.value)
    assert "stage 'write'" in message and str(ledger_dir / "write") in message
    assert "params.seed was 1, now 2" in message and "restart" in message
    # restart=True discards the old ledger and really reruns with the new seed
    results = run_blockwise("write", small_grid(), rb.write_block, params={"spec": spec, "seed": 2},
                            client=client, ledger_dir=ledger_dir, restart=True, progress=False)
    block = small_grid().block(3)
    assert results[3]["sum"] == int(rb.pattern(block, 2).sum(dtype=np.uint64))
    np.testing.assert_array_equal(read_volume(spec)[block.write.slices], rb.pattern(block, 2))


def test_gpu_blocks_run_only_on_gpu_workers_cpu_blocks_on_all(client, tmp_path):
    names = workers_by_name(client)
    spec = rb.create_volume(tmp_path / "out.zarr")
    grid = BlockGrid(Box.from_shape((8, 8, 40)), rb.BLOCK_SHAPE, alignment=rb.BLOCK_SHAPE)
    params = {"spec": spec, "seed": 3, "sleep": 0.02}
    gpu = run_blockwise("gpu-stage", grid, rb.write_block, params=params, client=client, resources={"GPU": 1},
                        ledger_dir=tmp_path / "ledger", progress=False)
    assert {r["worker"] for r in gpu.values()} == {names["gpu-0"]}
    cpu = run_blockwise("cpu-stage", grid, rb.write_block, params=params, client=client,
                        ledger_dir=tmp_path / "ledger", progress=False)
    assert {r["worker"] for r in cpu.values()} == {names["gpu-0"], names["cpu-0"]}


def test_failing_block_names_stage_and_block_and_keeps_finished_ones(client, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    params = {"spec": spec, "seed": 1, "fail_block": 2}
    with pytest.raises(BlockFailed, match=r"stage 'write' block 2 \[.*\) \(xyz\): cannot read input chunk"):
        run_blockwise("write", small_grid(), rb.write_block, params=params, client=client,
                      ledger_dir=tmp_path / "ledger", retries=1, progress=False)
    with Ledger.open(tmp_path / "ledger", "write", _fingerprint(params), small_grid().num_blocks) as ledger:
        assert not ledger.done_mask[2]


def _fingerprint(params: dict) -> dict:
    from pipeline.runner import stage_fingerprint

    return stage_fingerprint("write", small_grid(), rb.write_block, params)


def test_progress_line_reports_done_total_rate_and_eta():
    stream = io.StringIO()
    seen = []
    progress = Progress("segment", 200, already_done=50, stream=stream, interval=0.0,
                        callback=lambda d, t: seen.append((d, t)))
    progress.update(30)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines and lines[0].startswith("[segment] 80/200 blocks (40.0%)")
    assert "blocks/s" in lines[0] and "ETA" in lines[0] and "\r" not in stream.getvalue()
    assert seen == [(80, 200)]


def test_progress_and_dashboard_printed_to_stderr(client, tmp_path, capsys):
    run_blockwise("noop", small_grid(), rb.noop_block, params={}, client=client, ledger_dir=tmp_path, progress=True)
    run_blockwise("noop2", small_grid(), rb.noop_block, params={}, client=client, ledger_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "[noop] 4 blocks, 0 done in ledger, 4 to run" in err
    assert "[noop] 4/4 blocks (100.0%)" in err and "[noop2] 4/4 blocks (100.0%)" in err
    assert err.count(f"Dask dashboard: {client.dashboard_link}") == 1  # once per cluster, not per stage


def test_block_function_missing_on_workers_fails_fast_with_one_line(client, tmp_path, monkeypatch):
    (tmp_path / "driver_only_blocks.py").write_text("def fn(block):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver can import it; the running workers cannot
    import driver_only_blocks

    with pytest.raises(BlockFailed, match="block function driver_only_blocks.fn cannot be imported on the Dask "
                                          "workers .*No module named 'driver_only_blocks'"):
        run_blockwise("x", small_grid(), driver_only_blocks.fn, params={}, client=client,
                      ledger_dir=tmp_path / "ledger", progress=False)
