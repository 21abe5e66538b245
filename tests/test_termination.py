"""A SIGTERM whose KeyboardInterrupt lands inside a __del__ (and is swallowed there) is not lost."""

from __future__ import annotations

import gc
import signal

import pytest

from fedhlm.cli.main import _interrupt
from fedhlm.core.termination import raise_if_terminated, reset_termination, termination_requested


class _Finalised:
    def __del__(self) -> None:
        _interrupt(signal.SIGTERM, None)  # as if the signal arrived while this finaliser ran


def test_a_swallowed_interrupt_is_raised_at_the_next_checkpoint() -> None:
    reset_termination()
    try:
        raise_if_terminated()  # nothing requested: no-op
        obj = _Finalised()
        del obj  # the KeyboardInterrupt raised in __del__ is printed as "Exception ignored" and dropped
        gc.collect()
        assert termination_requested()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            raise_if_terminated()
    finally:
        reset_termination()
