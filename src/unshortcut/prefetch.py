"""Read ahead in a background thread: the one prefetcher of the project.

Patchify overlaps tile decoding with pooling, and training overlaps batch reading and
augmentation with the step. Decoders, numpy and torch release the GIL, so a thread is
real parallelism here without the start-up and pickling costs of processes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Produce ``items`` in a background thread, up to ``depth`` ahead of the consumer.

    Items are produced in order by one thread, so the result is the same with and
    without prefetching (a seeded augmentation generator is drawn in the same order). An
    exception in the producer is raised in the consumer; closing the consumer (or
    leaving its loop early) stops the producer.
    """
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as error:
            put((False, error))

    thread = threading.Thread(target=produce, name="unshortcut-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
