"""Progress bars and the shared console: every long loop over images shows one, with an ETA.

On a terminal the bars are rich's, transient; when stderr is a file or a pipe (a log, CI, `2> log.txt`)
bars would leave runs of blank lines, so the same progress is written as a plain line every
`PLAIN_EVERY_S` seconds and once at the end of any loop that took a while.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

#: Messages go to stderr so that stdout stays clean for CSV/JSON written by `predict`.
console = Console(stderr=True)


PLAIN_EVERY_S = 30.0
PLAIN_FINAL_S = 5.0


def clock_text(seconds: float) -> str:
    """90.4 -> '1:30'; 4000 -> '1:06:40'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """The subset of rich's Progress that visiontune uses, as plain log lines (for non-terminals)."""

    def __init__(self, every_s: float = PLAIN_EVERY_S, final_s: float = PLAIN_FINAL_S):
        self.every_s, self.final_s = every_s, final_s
        self.tasks: list[dict] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks:
            if time.perf_counter() - task["started"] >= self.final_s:
                self._line(task, final=True)

    def add_task(self, description: str, total: int | None = None, completed: int = 0) -> int:
        now = time.perf_counter()
        self.tasks.append({"description": description, "total": total, "done": completed, "started": now,
                           "start_done": completed, "shown": now})
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task["done"] += advance
        if time.perf_counter() - task["shown"] >= self.every_s:
            self._line(task)

    def _line(self, task: dict, final: bool = False) -> None:
        now = time.perf_counter()
        task["shown"] = now
        elapsed = now - task["started"]
        done, total = task["done"], task["total"]
        count = f"{done:.0f}/{total}" if total else f"{done:.0f}"
        rate = (done - task["start_done"]) / elapsed if elapsed > 0 else 0.0
        if final:
            tail = f"done in {clock_text(elapsed)}"
        elif total and rate > 0:
            tail = f"elapsed {clock_text(elapsed)}, eta {clock_text((total - done) / rate)}"
        else:
            tail = f"elapsed {clock_text(elapsed)}"
        console.print(f"{task['description']}: {count} {tail}", highlight=False, soft_wrap=True)


def progress_bar() -> Progress | PlainProgress:
    """A rich progress bar with count, elapsed time and ETA, transient so logs stay readable; plain
    periodic lines instead when the output is not a terminal."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar; `total` defaults to len(items) when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
