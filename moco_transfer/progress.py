"""Progress display that suits where the output goes: a live tqdm bar on a terminal, plain lines in a log file.

A tqdm bar redraws itself with carriage returns; in a SLURM log or nohup.out every redraw becomes text, so a
long run fills its log with bar fragments. When the bar's stream is not a terminal, `progress()` returns a
writer with tqdm's API (iterate, update, set_postfix, set_description, close, write) that prints one plain
line every `log_every` seconds instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

DEFAULT_LOG_EVERY = 30.0
_log_every = DEFAULT_LOG_EVERY


def set_log_every(seconds: float) -> None:
    """Seconds between plain progress lines for every bar made afterwards without its own `log_every` (0: none)."""
    global _log_every
    if not seconds >= 0:
        raise ValueError(f"--log-every {seconds!r}: expected 0 (no progress lines) or a number of seconds")
    _log_every = float(seconds)


def get_log_every() -> float:
    return _log_every


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def write(message: str, file: IO[str] | None = None) -> None:
    """Print a message without breaking a live bar (tqdm.write; a plain print when no bar is drawn)."""
    tqdm.write(message, file=file)


class PlainProgress:
    """tqdm's API for logs: a `desc: n/total (pct) elapsed<eta, rate, postfix` line every `log_every` s.

    Nothing is printed at start; a bar with `leave=True` prints its final state on close (unless that line was
    just printed), as a terminal bar leaves its last state on screen. `clock` is injectable, to test the interval.
    """

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 initial: float = 0, leave: bool = True, unit: str = "it", file: IO[str] | None = None,
                 log_every: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "", total, unit
        self.n = self.initial = initial
        self.leave, self.file = leave, file if file is not None else sys.stderr
        self.log_every = get_log_every() if log_every is None else float(log_every)
        self.clock = clock
        self.start = self.last_line = clock()
        self.postfix = ""
        self._last_state: tuple[float, str] | None = None
        self.disable = False
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate (made without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update()
        except GeneratorExit:  # the loop was left early (break, exception): no final line, as tqdm leaves its bar
            self.closed = True
            raise
        self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, (int, float)) else str(v).strip()}"
                                 for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Print the current state if `log_every` seconds have passed since the last line (for `bar.n = x`)."""
        if self.log_every > 0 and not self.closed:
            now = self.clock()
            if now - self.last_line >= self.log_every:
                self._emit(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.log_every > 0 and (self.n, self.postfix) != self._last_state:
            self._emit(self.clock())

    write = staticmethod(write)

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be printed now."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            percent = 100.0 * self.n / self.total
            parts.append(f"{tqdm.format_num(self.n)}/{tqdm.format_num(self.total)} ({percent:.0f}%)")
            eta = (self.total - self.n) / rate if rate else None
            parts.append(f" {tqdm.format_interval(elapsed)}<{tqdm.format_interval(eta) if eta is not None else '?'}")
        else:
            parts.append(f"{tqdm.format_num(self.n)} {self.unit} {tqdm.format_interval(elapsed)}")
        parts.append(f", {tqdm.format_sizeof(rate) if rate else '?'} {self.unit}/s")
        if self.postfix:
            parts.append(f", {self.postfix}")
        return "".join(parts)

    def _emit(self, now: float) -> None:
        self.last_line, self._last_state = now, (self.n, self.postfix)
        self.file.write(self.line(now) + "\n")
        self.file.flush()


def progress(iterable: Iterable | None = None, *, desc: str | None = None, total: float | None = None,
             initial: float = 0, leave: bool = True, unit: str = "it", disable: bool = False,
             file: IO[str] | None = None, log_every: float | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar when `file` (default stderr) is a terminal or the bar is disabled, else a PlainProgress.

    Extra keyword arguments (dynamic_ncols, mininterval, ...) go to tqdm and are ignored by the plain writer.
    `log_every` defaults to the value of `set_log_every` (the commands' --log-every option).
    """
    stream = file if file is not None else sys.stderr
    if disable or is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, unit=unit, disable=disable,
                    file=file, **tqdm_kwargs)
    return PlainProgress(iterable, desc=desc, total=total, initial=initial, leave=leave, unit=unit, file=stream,
                         log_every=log_every)
