"""What drives an endpoint's socket and runs its handlers: chosen once, when the endpoint is made.

* `OwnThreadDriver`: paho's own network thread (`loop_start`) and handler threads of the endpoint's own.
* `SharedLoopDriver`: a shared `NetworkLoop` drives the socket; handlers run in order on a shared pool.

The endpoint asks its driver to start, stop and abort the connection and to run handlers,
and never checks which one it has.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from fedhlm.transport.netloop import NetworkLoop
from fedhlm.transport.serial import SerialExecutor


class Handlers:
    """Where one endpoint's handlers run, one at a time and in arrival order.

    Threads of its own (`workers`, named `name_N`), or, given a shared `pool`, a serial queue on it.
    """

    def __init__(self, name: str, workers: int = 1, pool: Executor | None = None) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | SerialExecutor = (
            SerialExecutor(pool, name=name) if pool is not None
            else ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name))

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; RuntimeError after `shutdown`."""
        self._executor.submit(fn, *args)

    def on_worker(self) -> bool:
        """True inside one of these handlers (which must not wait for itself to finish)."""
        if isinstance(self._executor, SerialExecutor):
            return self._executor.in_task()
        return threading.current_thread().name.startswith(self._name + "_")

    def shutdown(self) -> None:
        """Drop what is queued, refuse more, and wait for the running handler unless called from it."""
        self._executor.shutdown(wait=not self.on_worker(), cancel_futures=True)


class Driver(Protocol):
    """Drives one paho client's connection for an endpoint."""

    handlers: Handlers

    def start(self, client: mqtt.Client, should_reconnect: Callable[[], bool]) -> None:
        """Connect `client` (configured with `connect_async`) and keep it connected while `should_reconnect()`."""

    def stop(self, client: mqtt.Client, timeout_s: float) -> None:
        """After `client.disconnect()`: let the DISCONNECT go out, then stop driving it."""

    def abort(self, client: mqtt.Client, started: bool) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the broker sends the Last Will)."""


class OwnThreadDriver:
    """paho's network thread of the endpoint's own: what a standalone role wants."""

    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers

    def start(self, client: mqtt.Client, should_reconnect: Callable[[], bool]) -> None:
        client.loop_start()  # paho's thread reconnects by itself; a permanent refusal disconnects it

    def stop(self, client: mqtt.Client, timeout_s: float) -> None:
        client.loop_stop()

    def abort(self, client: mqtt.Client, started: bool) -> None:
        client.reconnect_delay_set(3600, 3600)  # in case the network thread sees the drop first
        sock = client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if started:
            client.loop_stop()
        if isinstance(sock, socket.socket):
            sock.close()


class SharedLoopDriver:
    """A shared `NetworkLoop` drives the socket: many endpoints, one network thread."""

    def __init__(self, loop: NetworkLoop, handlers: Handlers, reconnect_delay_s: tuple[float, float]) -> None:
        self.loop = loop
        self.handlers = handlers
        self._reconnect_delay_s = reconnect_delay_s

    def start(self, client: mqtt.Client, should_reconnect: Callable[[], bool]) -> None:
        self.loop.add(client, reconnect_delay_s=self._reconnect_delay_s, should_reconnect=should_reconnect)

    def stop(self, client: mqtt.Client, timeout_s: float) -> None:
        self.loop.remove(client, timeout_s=timeout_s)

    def abort(self, client: mqtt.Client, started: bool) -> None:
        if started:
            self.loop.remove(client, abort=True)


def make_driver(name: str, *, workers: int = 1, network_loop: NetworkLoop | None = None,
                handler_pool: Executor | None = None,
                reconnect_delay_s: tuple[float, float] = (0.2, 10.0)) -> Driver:
    """The driver the `Endpoint` arguments ask for; `name` prefixes its handler threads."""
    handlers = Handlers(name, workers=workers, pool=handler_pool)
    if network_loop is not None:
        return SharedLoopDriver(network_loop, handlers, reconnect_delay_s)
    return OwnThreadDriver(handlers)
