"""A termination request that survives being swallowed.

The SIGTERM handler raises KeyboardInterrupt so that a command takes its Ctrl-C path. Python drops an
exception raised while a ``__del__`` or a weakref callback runs ("Exception ignored in ..."), so a signal
that lands there would be lost and the run would go on to the end. The handler therefore also sets this
flag, and long loops call :func:`raise_if_terminated` at their checkpoints.
"""

from __future__ import annotations

import threading

_REQUESTED = threading.Event()
_SIGNAL: list[str] = []


def request_termination(reason: str) -> None:
    """Record that the process was asked to stop (idempotent)."""
    if not _REQUESTED.is_set():
        _SIGNAL.append(reason)
    _REQUESTED.set()


def termination_requested() -> bool:
    return _REQUESTED.is_set()


def raise_if_terminated() -> None:
    """At a checkpoint: raise KeyboardInterrupt if a termination was requested, even one whose own
    KeyboardInterrupt was swallowed."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt(_SIGNAL[0] if _SIGNAL else "terminated")


def reset_termination() -> None:
    """Forget a request (tests that call several commands in one process)."""
    _REQUESTED.clear()
    _SIGNAL.clear()
