"""Progress of long work: lines ``[label] done/total points (pct)  elapsed  ETA`` on stderr.

A line is written when the work starts, at most every ``min_interval_s``
seconds while points finish (2 s by default: a log of a long sweep stays
readable), and when the last point finishes; :meth:`Progress.note` writes a
stage line (``[label] compiling ...``) at once.
"""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress"]


class Progress:
    """A one-line progress report: points done / total, elapsed time and ETA.

    The ETA extrapolates the rate of points finished in this session
    (resumed points are counted as done but not timed).
    """

    def __init__(self, total: int, done: int = 0, label: str = "sweep", *, stream=None,
                 enabled: bool = True, min_interval_s: float = 2.0):  # fmt: skip
        self.total, self.done, self.label = int(total), int(done), label
        self.start_done = self.done
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self.report(force=True)

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        new = self.done - self.start_done
        left = self.total - self.done
        if left == 0:
            eta = "0 s"
        elif new > 0:
            eta = f"{el / new * left:.1f} s"
        else:
            eta = "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"[{self.label}] {self.done}/{self.total} points ({pct:.0f}%)"
            f"  elapsed {el:.1f} s  ETA {eta}"
        )

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self.report(force=self.done >= self.total)

    def note(self, text: str) -> None:
        """Write ``[label] text`` now (a stage of the work: a group started, a file written)."""
        if self.enabled:
            print(f"[{self.label}] {text}", file=self.stream, flush=True)

    def report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= self.min_interval_s):
            print(self.line(), file=self.stream, flush=True)
            self._last = now
