"""One progress display for long work: a rich bar on a terminal, plain lines in logs, nothing when quiet.

When stderr is not a terminal (CI, `nohup`, a pipe into a log file), a live bar cannot redraw itself, so
a plain line like training libraries print in logs is written every ~5 % of the work and at the end:
`training 120/2400 (5%)  loss 0.4123  samples/s 2104  elapsed 0:00:03  eta 0:00:57`.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Mode = Literal["bar", "lines", "off"]
LINE_EVERY = 0.05  # share of the total between two plain progress lines


def progress_mode(quiet: bool = False) -> Mode:
    """'off' when asked to be quiet, else a live 'bar' on a terminal and plain 'lines' anywhere else."""
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def progress_enabled(quiet: bool = False) -> bool:
    """Whether progress is shown at all (a bar on a terminal, lines in a log): everywhere but with --quiet."""
    return progress_mode(quiet) != "off"


class ProgressBar:
    """`with ProgressBar("training", total, enabled) as bar: bar.advance(1, {"loss": "0.31"})`.

    `enabled` is True (a bar on a terminal, plain lines otherwise; see `progress_mode`), False (silent)
    or a mode name to force one.
    """

    def __init__(self, description: str, total: int, enabled: bool | Mode = True, completed: int = 0):
        self.enabled = enabled
        self.mode: Mode = enabled if isinstance(enabled, str) else progress_mode(quiet=not enabled)
        self.description = description
        self._progress = None
        self._task = None
        self._total = total
        self._completed = completed
        self._started_at = completed  # steps done before this display began (a resumed run)
        self._clock = 0.0
        self._stats = ""
        self._next_line = completed
        self._last_line: int | None = None

    def __enter__(self) -> ProgressBar:
        self._clock = time.monotonic()
        if self.mode == "lines":
            self._next_line = self._completed + self._line_step()
        if self.mode == "bar":
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                self.description, total=self._total, completed=self._completed, stats=""
            )
        return self

    def advance(self, steps: int = 1, stats: dict[str, str] | None = None) -> None:
        if self.mode == "off":
            return
        text = "  ".join(f"{name} {value}" for name, value in (stats or {}).items())
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, stats=text)
        if self.mode == "lines":
            self._completed += steps
            self._stats = text
            if self._completed >= self._next_line or self._completed >= self._total:
                self._write_line()
                self._next_line = self._completed + self._line_step()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, error, trace)
        # The end of the work (early stopping ends it before the total) gets its own line.
        advanced = self._completed > self._started_at
        if self.mode == "lines" and kind is None and advanced and self._last_line != self._completed:
            self._write_line()

    def _line_step(self) -> int:
        return max(1, math.ceil(self._total * LINE_EVERY))

    def _write_line(self) -> None:
        elapsed = time.monotonic() - self._clock
        done = self._completed - self._started_at
        remaining = max(0, self._total - self._completed)
        share = f" ({self._completed / self._total:.0%})" if self._total else ""
        parts = [f"{self.description} {self._completed}/{self._total}{share}"]
        if self._stats:
            parts.append(self._stats)
        parts.append(f"elapsed {_clock_time(elapsed)}")
        if remaining and done:
            parts.append(f"eta {_clock_time(elapsed / done * remaining)}")
        print("  ".join(parts), file=sys.stderr, flush=True)
        self._last_line = self._completed


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
