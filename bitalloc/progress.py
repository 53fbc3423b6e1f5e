"""Progress reporting for long steps (rich bars on stderr; silent when quiet)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Tracker:
    """Creates progress tasks; a Tracker without a rich Progress does nothing."""

    def __init__(self, progress: Optional[Progress] = None):
        self._progress = progress

    def task(self, description: str, total: int) -> "Task":
        if self._progress is None:
            return Task(None, None)
        return Task(self._progress, self._progress.add_task(description, total=total))


class Task:
    def __init__(self, progress: Optional[Progress], task_id):
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)


SILENT = Tracker()


@contextmanager
def tracker(quiet: bool = False) -> Iterator[Tracker]:
    if quiet:
        yield SILENT
        return
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        yield Tracker(progress)
