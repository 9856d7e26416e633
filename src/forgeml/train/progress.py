"""One rich progress display for long work; silent when not a terminal or when asked to be quiet."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_enabled(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty()


class ProgressBar:
    """`with ProgressBar("training", total, enabled) as bar: bar.advance(1, {"loss": "0.31"})`."""

    def __init__(self, description: str, total: int, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self.description = description
        self._progress = None
        self._task = None
        self._total = total
        self._completed = completed

    def __enter__(self) -> ProgressBar:
        if self.enabled:
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
        if self._progress is None:
            return
        text = "  ".join(f"{name} {value}" for name, value in (stats or {}).items())
        self._progress.update(self._task, advance=steps, stats=text)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, error, trace)
