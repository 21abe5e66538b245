"""SerialExecutor: one owner's tasks in arrival order, on a thread pool shared with other owners.

An endpoint runs its message handlers one at a time and in order. With a thread of its
own per endpoint, a thousand simulated clients would need a thousand idle handler
threads; sharing a small pool keeps each endpoint's order while the threads are shared.
Tasks of one owner never run concurrently; a long task delays only its own owner's queue
(and occupies one pool thread).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger(__name__)

_BATCH = 32  # tasks run per turn before the owner yields its pool thread to others
_current = threading.local()


class SerialExecutor:
    """`submit` / `shutdown` like a one-thread ThreadPoolExecutor, backed by a shared `pool`."""

    def __init__(self, pool: Executor, name: str = "serial") -> None:
        self._pool = pool
        self.name = name
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; raises RuntimeError after shutdown (as ThreadPoolExecutor does)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot submit after shutdown")
            self._queue.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
            self._idle.clear()
        self._schedule()

    def in_task(self) -> bool:
        """True on a thread that is running one of this executor's tasks."""
        return getattr(_current, "owner", None) is self

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Refuse new tasks; drop queued ones with `cancel_futures`; with `wait`, wait for the running one."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                self._queue.clear()
        if wait and not self.in_task():
            self._idle.wait()

    def _schedule(self) -> None:
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the shared pool is gone: nothing will run these
            with self._lock:
                self._queue.clear()
                self._scheduled = False
                self._idle.set()

    def _drain(self) -> None:
        _current.owner = self
        try:
            for _ in range(_BATCH):
                with self._lock:
                    if not self._queue:
                        self._scheduled = False
                        self._idle.set()
                        return
                    fn, args = self._queue.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("%s: task failed", self.name)
        finally:
            _current.owner = None
        self._schedule()  # more queued: take another turn behind the other owners
