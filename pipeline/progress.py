"""Progress of a blockwise stage: blocks done/total, rate and ETA as plain text on stderr.

WHY plain lines: most long runs end up in batch logs (Slurm output files, `nohup`, CI), where carriage-return
progress bars turn into one enormous line. On a terminal the line is redrawn in place; elsewhere a full line is
written every `interval` seconds and once at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 75 -> '1m15s', 4.2 -> '4s'."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Counts finished blocks of one stage and reports them.

    `callback`, when given, is called with (done, total) after every update (tests and UIs hook in here);
    `enabled=False` silences the text but keeps the callback.
    """

    def __init__(self, stage: str, total: int, already_done: int = 0, *, enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None,
                 callback: Callable[[int, int], None] | None = None) -> None:
        self.stage = stage
        self.total = total
        self.already_done = already_done
        self.done = already_done
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.callback = callback
        self.start = time.monotonic()
        self._last_print = self.start

    @property
    def rate(self) -> float:
        """Blocks per second run by this session (blocks skipped from the ledger do not count)."""
        elapsed = time.monotonic() - self.start
        return (self.done - self.already_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"[{self.stage}] {self.done}/{self.total} blocks ({pct:.1f}%), {rate:.1f} blocks/s, "
                f"ETA {format_duration(eta)}, elapsed {format_duration(time.monotonic() - self.start)}")

    def message(self, text: str) -> None:
        if self.enabled:
            self._write(f"[{self.stage}] {text}", final=True)

    def update(self, newly_done: int) -> None:
        self.done += newly_done
        if self.callback is not None:
            self.callback(self.done, self.total)
        now = time.monotonic()
        if self.enabled and now - self._last_print >= self.interval:
            self._last_print = now
            self._write(self.line(), final=False)

    def finish(self) -> None:
        if self.enabled:
            self._write(self.line(), final=True)

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
