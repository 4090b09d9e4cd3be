"""What a command tells its user while it works: one reporter, on stderr, for every command.

A command opens a ``Progress`` and hands ``step`` (a line saying what starts now: the
``progress`` callback of ``partc.compile`` / ``partc.plan``) or ``count`` (a counted task:
profiling runs, requests) to the work. On a terminal ``rich`` draws the current step with a
spinner and its running time, and a counted task as a bar with its count and the time left;
each finished step stays as one line with the seconds it took. When stderr is not a terminal
(a log file, CI), each step is one plain line as it starts and a counted task one line at
each tenth of the way, with the time left. ``quiet`` (``-q``) prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Live

PREFIX = "partc: "


class Progress:
    """The progress of one command: steps and counted tasks, drawn or printed on ``stream``."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self._quiet = quiet
        self._console = Console(file=stream or sys.stderr, highlight=False)
        self._live: Live | None = None
        self._step: tuple[str, float, TaskID | None] | None = None  # text, start, its spinner
        self._counts: dict[str, tuple[float, int, TaskID | None]] = {}  # text -> start, tenths shown, its bar

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, text: str) -> None:
        """Say that ``text`` starts now (and that the previous step is done)."""
        if self._quiet:
            return
        self._end_step()
        spinner = self._task(text, None)
        if spinner is None:
            self._print(text)
        self._step = (text, time.perf_counter(), spinner)

    def count(self, text: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` items of the task ``text``; the task ends when ``done == total``."""
        if self._quiet or total <= 0:
            return
        now = time.perf_counter()
        start, shown, bar = self._counts.get(text) or (now, -1, self._task(text, total))
        left = (now - start) / done * (total - done) if done else None
        detail = f"{done}/{total}" + (f", {_seconds(left)} left" if left is not None and done < total else "")
        if bar is not None:
            self._live.update(bar, completed=done, detail=detail)
        elif 10 * done // total > shown:
            self._print(f"{text}: {detail}")
        self._counts[text] = (start, 10 * done // total, bar)
        if done >= total:
            del self._counts[text]
            if bar is not None:
                self._live.remove_task(bar)
                self._print(f"{text}: {total} in {_seconds(now - start)}")

    def close(self) -> None:
        """End the last step and take the drawing off the terminal (before the command prints its result)."""
        self._end_step()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _task(self, text: str, total: int | None) -> TaskID | None:
        """A line drawn for ``text`` on a terminal (None elsewhere)."""
        if not self._console.is_terminal:
            return None
        if self._live is None:
            self._live = Live(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                              TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self._console,
                              transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self._live.add_task(text, total=total, detail="")

    def _end_step(self) -> None:
        if self._step is None:
            return
        text, start, spinner = self._step
        self._step = None
        if spinner is not None:
            self._live.remove_task(spinner)
            self._print(f"{text} ({_seconds(time.perf_counter() - start)})")

    def _print(self, text: str) -> None:
        self._console.print(PREFIX + text, markup=False, soft_wrap=True)


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60)} s"
