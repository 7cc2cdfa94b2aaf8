"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

The device pipeline prepares batch n+1 (decode and augmentation kernels, which release the GIL) while the
training thread queues step n. One producer thread keeps the items in order, so what it draws from seeded
generators is the same as when the items are made in the consumer's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1  # how often a producer blocked on a full queue looks for a stop request
_JOIN_SECONDS = 60.0  # a producer still busy after this (a hung read) is left to die with the process


class _Raised:
    """An exception of the producer, carried to the consumer's thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate `source` in a daemon thread, at most `depth` items ahead; re-raise its errors in the consumer.

    Stop it with `close()` (also at the end of a `with` block or after the last item): the producer finishes the
    item it is making, closes `source` in its own thread and exits. A consumer interrupted by an exception or
    Ctrl-C must call close(), which DevicePipeline does in a `finally`.
    """

    def __init__(self, source: Iterator[T], depth: int, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth: expected at least 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    break
            else:
                self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - every failure is the consumer's to see
            self._put(_Raised(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Raised):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer and wait for it; items made but not taken are dropped."""
        self._stop.set()
        deadline = time.monotonic() + _JOIN_SECONDS
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # a producer waiting for room sees the stop request within _POLL_SECONDS
            self._thread.join(timeout=_POLL_SECONDS)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
