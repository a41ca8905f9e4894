"""A producer on a background thread with a bounded queue (the loader's and annotate's prefetch)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def background(make: Callable[[], Iterable[T]], depth: int, name: str) -> Iterator[T]:
    """Yield the items of ``make()``, produced on a thread at most ``depth`` items ahead.

    The thread starts on the first ``next``. An exception in the producer is raised here, in the
    consumer's thread. Closing this generator (``close()``, garbage collection, or leaving a
    ``for`` loop early through an exception) stops the producer at its next item and joins it, so
    no thread outlives its consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        items = None
        try:
            items = iter(make())  # inside the try: a failing make() must reach the consumer too
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer's thread
            put(_Raised(exc))
        finally:
            close = getattr(items, "close", None)  # None too when make() itself failed
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
