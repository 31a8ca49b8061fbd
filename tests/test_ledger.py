"""The block ledger on its own: durable batches, torn tails, fingerprint refusal, locking, scale."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import LedgerError
from storage.ledger import LOG, Ledger, describe_differences, read_done_count

FP = {"stage": "seg", "grid": {"block_shape_zyx": [8, 8, 8]}, "params": {"threshold": 0.5, "model": "a"}}


def test_finished_blocks_and_results_survive_reopen(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 100) as ledger:
        ledger.add([3, 7], [{"n": 3}, {"n": 7}])
        ledger.add([50], [None])
    with Ledger.open(tmp_path, "seg", FP, 100) as ledger:
        assert ledger.done_count == 3
        assert np.flatnonzero(ledger.done_mask).tolist() == [3, 7, 50]
        assert ledger.results == {3: {"n": 3}, 7: {"n": 7}, 50: None}
        todo = np.concatenate(list(ledger.todo_chunks(chunk=16)))
        assert todo.size == 97 and 3 not in todo and 99 in todo


def test_unflushed_blocks_are_not_marked_done_after_a_crash(tmp_path):
    ledger = Ledger.open(tmp_path, "seg", FP, 10, flush_every=1000, flush_seconds=3600)
    ledger.add([1], ["durable"])
    ledger.flush()
    ledger.add([2], ["lost"])  # buffered, never flushed: the driver "dies" here
    assert read_done_count(tmp_path, "seg") == 1
    ledger._log_fd, ledger._pending_ids = None, []  # simulate the kill: no flush on the way out
    ledger.close()
    with Ledger.open(tmp_path, "seg", FP, 10) as again:
        assert again.results == {1: "durable"}


def test_torn_tail_is_cut_off_and_appends_continue(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        ledger.add([1, 2], ["a", "b"])
    log = tmp_path / "seg" / LOG
    good = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"BLK1\x05\x00\x00\x00garbage")  # a record header whose body never made it to disk
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        assert ledger.results == {1: "a", 2: "b"}
        assert log.stat().st_size == good
        ledger.add([9], ["c"])
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        assert ledger.results == {1: "a", 2: "b", 9: "c"}


def test_corrupted_record_is_not_trusted(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        ledger.add([4], ["x"])
    log = tmp_path / "seg" / LOG
    data = bytearray(log.read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the payload: CRC mismatch
    log.write_bytes(bytes(data))
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        assert ledger.done_count == 0


def test_different_fingerprint_is_refused_with_what_differs(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 100) as ledger:
        ledger.add([1], [None])
    changed = {**FP, "params": {"threshold": 0.6, "model": "a"}}
    with pytest.raises(LedgerError) as err:
        Ledger.open(tmp_path, "seg", changed, 100)
    message = str(err.value)
    assert message.startswith("stage 'seg': ledger ")
    assert str(tmp_path / "seg") in message
    assert "params.threshold was 0.5, now 0.6" in message
    assert "\n" not in message
    with Ledger.open(tmp_path, "seg", changed, 100, restart=True) as ledger:
        assert ledger.done_count == 0


def test_describe_differences_names_added_and_removed_fields():
    diffs = describe_differences({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}, "d": [1]})
    assert diffs == ["a removed (was 1)", "b.c was 2, now 3", "d added ([1])"]


def test_a_second_driver_on_the_same_ledger_is_refused(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 10):
        with pytest.raises(LedgerError, match="in use by another run"):
            Ledger.open(tmp_path, "seg", FP, 10)
    with Ledger.open(tmp_path, "seg", FP, 10):  # released on close
        pass


def test_block_id_beyond_the_grid_is_refused(tmp_path):
    with Ledger.open(tmp_path, "seg", FP, 10) as ledger:
        ledger.add([9], [None])
    with pytest.raises(LedgerError, match="names block 9 but the grid has 5 blocks"):
        Ledger.open(tmp_path, "seg", FP, 5)


def test_bad_stage_name_is_refused(tmp_path):
    with pytest.raises(LedgerError, match="stage name '../x'"):
        Ledger.open(tmp_path, "../x", FP, 10)


def test_many_batches_resume_exactly(tmp_path):
    n = 200_000
    rng = np.random.default_rng(0)
    order = rng.permutation(n)[: n // 2]
    with Ledger.open(tmp_path, "seg", FP, n, flush_every=5000) as ledger:
        for chunk in np.array_split(order, 40):
            ledger.add(chunk.tolist(), [None] * chunk.size)
    with Ledger.open(tmp_path, "seg", FP, n) as ledger:
        assert ledger.done_count == n // 2
        assert set(np.flatnonzero(ledger.done_mask).tolist()) == set(order.tolist())
        assert sum(ids.size for ids in ledger.todo_chunks()) == n - n // 2
