"""Progress of long loops on the main process: rich bars on a terminal, plain lines in a log file.

When the console writes to a terminal, :func:`progress` shows a rich bar (count, elapsed, ETA). When
it does not (``nohup``, SLURM, CI, ``> run.log 2>&1``), a bar would only be written when it finishes,
so :func:`progress` writes plain lines instead (what ``tqdm`` users expect in a log)::

    fine-tune epoch 1/3: 120/500 (24%), 3.21 it/s, elapsed 0:00:37, eta 0:01:58

one whenever 10% more of the loop is done or 30 s have passed since the last line, whichever comes
first, and one when the loop ends (:class:`LineSchedule`). The shared :func:`console` is wide when it
does not write to a terminal, so tables written to a log are never cut to 80 columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "console", "LOG_WIDTH", "LINE_SECONDS", "LINE_FRACTION", "LineSchedule", "progress_line", "is_log"]

LOG_WIDTH = 240  # columns of the console when it writes to a file: wider than every table the tool prints
LINE_SECONDS = 30.0  # a plain progress line at least this often ...
LINE_FRACTION = 0.1  # ... and at least at every 10% of the loop

_CONSOLE = None


def console():
    """The shared rich console (created on first use; writes to the current ``sys.stdout``).

    Not on a terminal (nor in Jupyter) its width is :data:`LOG_WIDTH`, so tables and long lines in a
    log file are whole; on a terminal it follows the terminal's width."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console()
    # sys.stdout can change under the same process (tests capture it): decide at every use
    _CONSOLE.width = LOG_WIDTH if is_log(_CONSOLE) else None
    return _CONSOLE


def is_log(con=None) -> bool:
    """True when ``con`` (default: the shared console) writes to a file or pipe rather than a terminal.

    Rich's own test is used (``FORCE_COLOR``/``TTY_COMPATIBLE`` override it); Jupyter counts as a terminal."""
    con = con if con is not None else console()
    return not con.is_terminal and not con.is_jupyter


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(description: str, n: int, total: int | None, elapsed: float) -> str:
    """One plain progress line: position ``n/total`` (percent), rate, elapsed time and ETA (H:MM:SS).

    The rate is ``it/s`` (``s/it`` below one item per second); without ``total`` there is no percent
    nor ETA. ``elapsed`` in seconds since the loop started."""
    rate = n / elapsed if elapsed > 0 else None
    if rate is None or n == 0:
        speed = "? it/s"
    elif rate >= 1:
        speed = f"{rate:.2f} it/s"
    else:
        speed = f"{1 / rate:.2f} s/it"
    if total:
        eta = _clock((total - n) / rate) if rate else "?"
        return f"{description}: {n}/{total} ({100 * n / total:.0f}%), {speed}, elapsed {_clock(elapsed)}, eta {eta}"
    return f"{description}: {n} done, {speed}, elapsed {_clock(elapsed)}"


class LineSchedule:
    """When a loop of ``total`` items (None: unknown) writes a plain progress line.

    A line is due after an item when at least ``every_seconds`` passed since the last line (or the
    start), or when the position reached the next multiple of ``every_fraction * total`` since the last
    line; :meth:`last` says whether the final position still needs its line. Times in seconds from any
    monotonic clock (the caller passes them, so the rule is testable without waiting).
    """

    def __init__(self, total: int | None, start: float, *, every_seconds: float = LINE_SECONDS, every_fraction: float = LINE_FRACTION):
        self.total = total
        self.every_seconds = every_seconds
        self.step = total * every_fraction if total else None
        self.last_time = start
        self.last_n = 0
        self._next_mark = self._mark_after(0)

    def _mark_after(self, n: int) -> float:
        if self.step is None:
            return math.inf
        k = math.floor(n / self.step + 1e-9) + 1  # the next multiple of step above n
        return k * self.step - 1e-9

    def due(self, n: int, now: float) -> bool:
        """True when the line for position ``n`` at time ``now`` should be written (then it is recorded)."""
        if n >= self._next_mark or now - self.last_time >= self.every_seconds:
            self.last_time, self.last_n = now, n
            self._next_mark = self._mark_after(n)
            return True
        return False

    def last(self, n: int) -> bool:
        """True when the final position ``n`` has not had its line yet (an empty loop has none)."""
        return n != self.last_n


def _plain(iterable: Iterable[T], description: str, total: int | None, write: Callable[[str], None], clock=time.monotonic) -> Iterator[T]:
    """Iterate, writing :func:`progress_line` lines on :class:`LineSchedule`'s schedule (and at the end)."""
    start = clock()
    schedule = LineSchedule(total, start)
    n = 0
    for item in iterable:
        yield item
        n += 1
        now = clock()
        if schedule.due(n, now):
            write(progress_line(description, n, total, now - start))
    if schedule.last(n):
        write(progress_line(description, n, total, clock() - start))


def _write_plain(line: str) -> None:
    console().print(line, markup=False, highlight=False, soft_wrap=True)  # rich flushes after each print


def progress(iterable: Iterable[T], description: str, accelerator=None, total: int | None = None) -> Iterator[T]:
    """Iterate with progress on the main process (nothing on the others): a rich bar (count, elapsed,
    ETA) on a terminal, plain lines (:func:`progress_line`, at most every 30 s or 10%, and the last)
    when the console writes to a file or pipe."""
    if accelerator is not None and not accelerator.is_main_process:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if is_log():
        yield from _plain(iterable, description, total, _write_plain)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
