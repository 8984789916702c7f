"""A background thread that produces the loader's next batches while the training step runs."""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import torch

_END = object()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # prefetchers whose thread may still be reading


@atexit.register
def _stop_every_prefetcher() -> None:
    """At interpreter exit, stop and join every prefetch thread: a loader that is still reading
    ahead (the next epoch's first batches) when a script ends must not be torn down mid-read
    inside TensorStore, which aborts the process."""
    for prefetcher in list(_LIVE):
        prefetcher.close()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _BatchProducer:
    """What the prefetch thread runs. It holds no reference to the iterator, so an iterator
    dropped in the middle of an epoch is collected, and its __del__ stops the thread."""

    def __init__(self, source: Iterator, finish: Callable, depth: int, device: torch.device | None):
        self.source, self.finish = source, finish
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.cuda = device is not None and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def produce(self):
        try:
            raw = next(self.source)
        except StopIteration:
            return _END
        if not self.cuda:
            return self.finish(raw), None
        with torch.cuda.stream(self.stream):
            batch = self.finish(raw)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        ready.synchronize()  # on this background thread: a queued batch is entirely on the GPU
        return batch, ready

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                item = self.produce()
                self.put(item)
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.put(_Failure(e))

    def put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class PrefetchIterator:
    """Runs the batch source on a background thread, `depth` batches ahead. On CUDA the
    host-to-device copies run on their own stream and the consumer's stream waits for them."""

    def __init__(self, source: Iterator, finish: Callable, depth: int, device: torch.device | None):
        self.producer = _BatchProducer(source, finish, depth, device)
        self.device, self.depth = device, depth
        self.wait_seconds = 0.0
        self.closed = False
        self.thread = threading.Thread(target=self.producer.run, name="batch-prefetch", daemon=True)
        if depth > 0:
            _LIVE.add(self)
            self.thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        item = self.producer.produce() if self.depth == 0 else self.producer.queue.get()
        self.wait_seconds += time.perf_counter() - started
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, ready = item
        if ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            for t in batch[:3]:
                if t is not None:
                    t.record_stream(consumer)
        return batch

    def __len__(self) -> int:
        return len(self.producer.source)

    def close(self) -> None:
        self.closed = True
        self.producer.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            while self.thread.is_alive():
                try:
                    self.producer.queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.thread.join()
        shutdown = getattr(self.producer.source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
