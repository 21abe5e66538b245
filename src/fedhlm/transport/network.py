"""How a role gets its endpoint: the network it runs on, chosen once, never branched on by the role.

A role (client, edge, cloud, LLM worker) asks its `Network` for an endpoint and from then on
only publishes, subscribes and requests; which threads drive the connection, or whether
there is a broker at all, is the network's business:

* `OwnThreads`: a paho network thread and a handler thread per endpoint (a standalone role).
* `SharedLoop`: many endpoints on one selector thread and a small handler pool, each still
  with its own MQTT connection, session and Last Will (a gateway, a large simulation).
* `MemoryNetwork` (memory.py): no broker, an in-process bus with the same endpoint interface
  (millisecond unit tests of a role's logic).

Adding a way to run is one class with an `endpoint` method and an entry in `NETWORKS`.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.memory import MemoryNetwork
from fedhlm.transport.messages import Message
from fedhlm.transport.netloop import NetworkLoop


class Network(Protocol):
    """Makes the endpoints of the roles that run on it, and owns whatever they share."""

    def endpoint(self, address: BrokerAddress, *, persistent: bool = False,
                 will: tuple[str, Message] | None = None) -> Any: ...

    def close(self) -> None: ...


class OwnThreads:
    """Each endpoint drives its own connection and runs its own handlers: what one process per role wants."""

    def endpoint(self, address: BrokerAddress, *, persistent: bool = False,
                 will: tuple[str, Message] | None = None) -> Endpoint:
        return Endpoint(address, persistent=persistent, will=will)

    def close(self) -> None:
        """Nothing is shared."""


class SharedLoop:
    """One selector thread drives every endpoint's socket; handlers run in order per endpoint on a shared pool.

    A thousand clients in one process need a handful of threads instead of two thousand;
    `close` stops the loop and the pool once the endpoints are closed.
    """

    def __init__(self, handler_threads: int = 8, name: str = "shared") -> None:
        self.loop = NetworkLoop(name=f"{name}-netloop").start()
        self.pool: Executor = ThreadPoolExecutor(max_workers=handler_threads, thread_name_prefix=f"{name}-handlers")

    def endpoint(self, address: BrokerAddress, *, persistent: bool = False,
                 will: tuple[str, Message] | None = None) -> Endpoint:
        return Endpoint(address, persistent=persistent, will=will, network_loop=self.loop, handler_pool=self.pool)

    def close(self) -> None:
        self.loop.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)


NETWORKS: dict[str, type] = {"own_threads": OwnThreads, "shared_loop": SharedLoop, "memory": MemoryNetwork}


def make_network(name: str, **options: Any) -> Network:
    """The network registered as `name` (see `NETWORKS`)."""
    if name not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {name!r}")
    return NETWORKS[name](**options)
