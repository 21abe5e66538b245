"""One thread that drives many MQTT connections: how a gateway hosts a thousand devices.

paho's `loop_start` gives every connection its own network thread. A simulation (or a
gateway) with a thousand clients in one process then has a thousand threads competing for
the GIL to answer keep-alives and acks. `NetworkLoop` instead waits on every socket with
one `selectors` call and runs paho's external-loop API (`loop_read`, `loop_write`,
`loop_misc`) for the ones that are ready. Each client keeps its own TCP connection and
MQTT session, so what the broker sees is unchanged.

Threading rule: paho calls that open, read, write or close a socket run on the loop thread
only (`connect`, `reconnect`, `loop_*`, dropping a connection). Other threads may publish,
subscribe and disconnect, which only queue packets; paho then asks for write interest
through `on_socket_register_write`, which wakes the loop.

    loop = NetworkLoop().start()
    ep = Endpoint(address, network_loop=loop).start().wait_connected()
    ...
    ep.close(); loop.stop()
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 0.5  # keep-alive checks (PINGREQ, dead connections) per connection
MAX_PACKETS_PER_WAKE = 64  # packets read from one socket before the other sockets get their turn


@dataclass
class _Connection:
    client: mqtt.Client
    should_reconnect: Callable[[], bool]
    delays: tuple[float, float]
    sock: socket.socket | None = None
    interest: int = 0
    retry_at: float | None = None  # monotonic time of the next connect attempt
    failures: int = 0
    finish_by: float = 0.0  # while removing: drop the socket at this time even if DISCONNECT is not out
    done: threading.Event = field(default_factory=threading.Event)
    on_open: Callable[..., None] | None = None  # the client's own on_socket_open (e.g. socket options)


class NetworkLoop:
    """A selector loop for many paho clients on one thread; see the module docstring."""

    def __init__(self, name: str = "fedhlm-netloop") -> None:
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []  # run on the loop thread
        self._dirty: set[int] = set()  # id(client) whose write interest must be recomputed
        self._connections: dict[int, _Connection] = {}  # id(client) -> connection
        self._retrying: set[int] = set()  # loop thread only: connections with a connect attempt due
        self._removing: set[int] = set()  # loop thread only: connections waiting for their DISCONNECT to go out
        self._backlog: set[int] = set()  # loop thread only: connections with bytes left after their turn
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._woken = False

    # -- public API (any thread) ---------------------------------------------------------
    def start(self) -> "NetworkLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Drop every remaining connection (without DISCONNECT) and end the thread."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, client: mqtt.Client, *, should_reconnect: Callable[[], bool],
            reconnect_delay_s: tuple[float, float] = (0.2, 10.0)) -> None:
        """Take over `client`, configured with `connect_async`, and connect it from the loop thread.

        `should_reconnect()` is asked after every lost connection; False lets it rest.
        """
        if self._thread is None:
            raise RuntimeError("start() the network loop first")
        conn = _Connection(client, should_reconnect, reconnect_delay_s, retry_at=0.0, on_open=client.on_socket_open)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_write_changed
        client.on_socket_unregister_write = self._on_write_changed
        key = id(client)
        self._connections[key] = conn  # now, so that a remove() right after start() finds it
        self._call(lambda: self._retrying.add(key))

    def remove(self, client: mqtt.Client, timeout_s: float = 5.0, abort: bool = False) -> None:
        """Stop serving `client`: after its DISCONNECT is written, or at once with `abort`
        (the socket is dropped as a crash would, so the broker sends the Last Will)."""
        conn = self._connections.get(id(client))
        if conn is None:
            return
        conn.finish_by = 0.0 if abort else time.monotonic() + timeout_s
        self._call(lambda: self._start_removing(conn))
        if threading.current_thread() is not self._thread:
            conn.done.wait(timeout_s + 1.0)

    # -- loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            timeout = 0.0 if self._backlog else max(0.0, min(next_misc, self._next_retry(now)) - now)
            try:
                events = self._selector.select(timeout)
            except OSError:
                log.exception("%s: select failed", self._name)
                time.sleep(0.05)
                continue
            if any(key.data is None for key, _ in events):
                self._drain_wake()  # before running the calls: a call queued after this wakes us again
            self._run_calls()
            for key, mask in events:
                conn = key.data
                if conn is None or conn.sock is None:  # the wake-up socket, or dropped by a call above
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and conn.sock is not None:
                        conn.client.loop_write()
                except Exception:  # one broken connection must not stop the others
                    log.exception("%s: network error on %s", self._name, _cid(conn.client))
            for key in list(self._backlog):
                self._backlog.discard(key)
                conn = self._connections.get(key)
                if conn is not None and conn.sock is not None:
                    try:
                        self._read(conn)
                    except Exception:
                        log.exception("%s: network error on %s", self._name, _cid(conn.client))
            now = time.monotonic()
            if now >= next_misc:
                for conn in list(self._connections.values()):
                    if conn.sock is not None:
                        try:
                            conn.client.loop_misc()
                        except Exception:
                            log.exception("%s: keep-alive failed on %s", self._name, _cid(conn.client))
                next_misc = now + MISC_INTERVAL_S
            self._connect_due(now)
            self._update_interest()
            for key in list(self._removing):
                conn = self._connections.get(key)
                if conn is not None:
                    self._maybe_finish(conn)
        for conn in list(self._connections.values()):
            self._drop(conn)

    def _read(self, conn: _Connection) -> None:
        """paho parses one packet per `loop_read`: go on while bytes wait. Over TLS this is needed, not just
        faster: bytes already decrypted into the SSL buffer never wake the selector again."""
        for _ in range(MAX_PACKETS_PER_WAKE):
            conn.client.loop_read()
            if conn.sock is None or not _bytes_waiting(conn.sock):
                return
        if conn.sock is not None and _bytes_waiting(conn.sock):
            self._backlog.add(id(conn.client))  # the rest on the next turn, which then does not wait in select

    def _next_retry(self, now: float) -> float:
        due = [c.retry_at for c in map(self._connections.get, self._retrying) if c is not None and c.retry_at is not None]
        return min(due, default=now + MISC_INTERVAL_S)

    def _connect_due(self, now: float) -> None:
        for key in list(self._retrying):
            conn = self._connections.get(key)
            if conn is None or key in self._removing:
                self._retrying.discard(key)
                continue
            if conn.retry_at is None or conn.retry_at > now:
                continue
            self._retrying.discard(key)
            conn.retry_at = None
            try:
                conn.client.reconnect()  # non-blocking socket after a (loopback-fast) TCP connect; CONNECT queued
                conn.failures = 0
            except (OSError, ValueError) as exc:
                conn.failures += 1
                low, high = conn.delays
                delay = min(high, low * 2 ** min(conn.failures - 1, 16))
                conn.retry_at = now + delay
                self._retrying.add(key)
                log.warning("%s: %s could not connect (%s); retrying in %.1f s", self._name, _cid(conn.client), exc, delay)

    def _update_interest(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in dirty:
            conn = self._connections.get(key)
            if conn is None or conn.sock is None:
                continue
            interest = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.client.want_write() else 0)
            if interest != conn.interest:
                try:
                    self._selector.modify(conn.sock, interest, conn)
                    conn.interest = interest
                except (KeyError, ValueError, OSError):
                    log.debug("%s: socket of %s is gone", self._name, _cid(conn.client))

    def _start_removing(self, conn: _Connection) -> None:
        conn.retry_at = None
        self._removing.add(id(conn.client))
        self._maybe_finish(conn)

    def _maybe_finish(self, conn: _Connection) -> None:
        """Forget a connection once its DISCONNECT went out (paho then closes the socket) or the time is up."""
        if conn.sock is None or time.monotonic() >= conn.finish_by:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        if conn.sock is not None:
            sock = conn.sock
            self._unregister(conn)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._connections.pop(id(conn.client), None)
        self._removing.discard(id(conn.client))
        self._retrying.discard(id(conn.client))
        conn.done.set()

    def _unregister(self, conn: _Connection) -> None:
        if conn.sock is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.sock = None
        conn.interest = 0

    # -- paho socket callbacks ----------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        conn = self._connections.get(id(client))
        if conn is None:
            return
        if conn.on_open is not None:
            conn.on_open(client, userdata, sock)
        conn.sock = sock
        conn.interest = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        self._selector.register(sock, conn.interest, conn)

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        conn = self._connections.get(id(client))
        if conn is None or conn.sock is not sock:
            return
        self._unregister(conn)
        if id(client) not in self._removing and not self._stopping and conn.should_reconnect():
            conn.failures += 1
            low, high = conn.delays
            conn.retry_at = time.monotonic() + min(high, low * 2 ** min(conn.failures - 1, 16))
            self._retrying.add(id(client))  # socket callbacks run on the loop thread (see the module docstring)

    def _on_write_changed(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        with self._lock:
            self._dirty.add(id(client))
        if threading.current_thread() is not self._thread:
            self._wake()

    # -- plumbing -------------------------------------------------------------------------
    def _call(self, fn: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            fn()
            return
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("%s: a scheduled call failed", self._name)

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self) -> None:
        # empty the socket first, then clear the flag: cleared first, a wake-up landing in between
        # would have its byte swallowed here and leave the flag set, muting every later wake-up
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            self._woken = False


def _bytes_waiting(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket):
        return sock.pending() > 0  # encrypted bytes still in the kernel make the selector fire again
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing waiting (BlockingIOError), or a broken socket the next read reports
        return False


def _cid(client: mqtt.Client) -> str:
    raw = getattr(client, "_client_id", b"")
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
