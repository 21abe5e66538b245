"""Start a whole FedHLM deployment (LLM worker, cloud, edges, clients) against one broker, run rounds, stop.

This is what a simulation does with threads; each role still talks to the others only
over MQTT, exactly as it would as its own process on another host (`fedhlm client ...`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedhlm.core.aggregation import Params
from fedhlm.core.operating_point import with_curve
from fedhlm.core.policies import policy_class
from fedhlm.core.records import ByteCounts, Drafter, ModelLimits, RoutedToken
from fedhlm.core.settings import ClientSettings
from fedhlm.maths.verification import QFunction
from fedhlm.roles.client import Client, RoutingHead
from fedhlm.roles.cloud import CloudServer
from fedhlm.roles.edge import EdgeServer
from fedhlm.roles.edge_cache import EdgeResolver
from fedhlm.roles.llm_service import LLMService, SessionVerifier, SharedSessions
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.network import Network, OwnThreads, SharedLoop

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DeploymentSpec:
    """Who runs, where, and with what settings: the client template's sections are the deployment's too
    (the edges' quorum and deadline, the aggregation, the verification mode), so they are set once."""

    assignment: dict[str, str]  # client id -> edge id
    client: ClientSettings  # template; client_id / edge_id are filled per client
    head_factory: Callable[[], RoutingHead]  # a fresh head per client (e.g. a TorchHead with its fit engine)
    q_fn: QFunction
    class_of: Callable[[int], int]
    drafter: Drafter | None = None  # the clients' SLM (one model instance; each client drafts its own inputs)
    pad_id: int = 0
    llm_limits: ModelLimits | None = None  # the LLM's vocabulary and positions, checked per request
    llm_sessions: SessionVerifier | None = None  # the LLM's generation sessions (None: it keeps none)
    session_ttl_s: float = 60.0  # a session unused this long is dropped (the config's generation.session_ttl_s)
    embedding_dim: int = 384
    checkpoint_dir: Path | None = None
    llm_workers: int = 1
    client_overrides: dict[str, dict] = field(default_factory=dict)  # client id -> `ClientSettings.with_changes`
    # clients share one network thread and a few handler threads, as on a gateway; False: two threads each
    shared_network: bool = True
    handler_threads: int = 8

    @property
    def edges(self) -> list[str]:
        return sorted(set(self.assignment.values()))

    @property
    def federated(self) -> bool:
        return policy_class(self.client.policy).federated

    @property
    def neighbour_p2p(self) -> bool:
        return self.client.p2p.asks_neighbours


class Deployment:
    """The roles of one run. `address(user_id)` gives each role its way into the broker."""

    def __init__(self, spec: DeploymentSpec, address: Callable[[str], BrokerAddress]) -> None:
        self.spec = spec
        self.address = address
        self.llm: list[LLMService] = []
        self.cloud: CloudServer | None = None
        self.edges: dict[str, EdgeServer] = {}
        self.clients: dict[str, Client] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._network: Network | None = None

    def initial_params(self) -> Params:
        return with_curve(self.spec.head_factory().params(), self.spec.client.routing)

    def start(self) -> "Deployment":
        """Start every role; if one fails, stop the ones already running and re-raise."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "Deployment":
        spec = self.spec
        fed, seed = spec.client.federation, spec.client.seed
        sessions = SharedSessions(spec.llm_sessions) if spec.llm_sessions is not None else None
        for i in range(spec.llm_workers):
            worker = LLMService(self.address("llm" if i == 0 else f"llm{i}"), spec.q_fn, mode=spec.client.routing.verify,
                                pad_id=spec.pad_id, seed=seed + i, limits=spec.llm_limits,
                                max_age_s=spec.client.routing.llm_timeout_s,  # older: its client gave up on it
                                sessions=sessions, session_ttl_s=spec.session_ttl_s)
            self.llm.append(worker.start())
        p2p = spec.client.p2p
        if spec.federated or spec.neighbour_p2p or p2p.through_edge:  # edges also relay or answer peer queries
            init = self.initial_params()
            ckpt = spec.checkpoint_dir
            self.cloud = CloudServer.from_settings("cloud", self.address("cloud"), spec.edges, init, fed,
                                                   checkpoint=ckpt / "cloud.json" if ckpt else None).start()
            for edge in spec.edges:
                members = [c for c, e in spec.assignment.items() if e == edge]
                # peer queries forwarded between clusters (resolver peers; through the edge, edges share entries)
                neighbours = [e for e in spec.edges if e != edge] if spec.neighbour_p2p and not p2p.through_edge else []
                resolver = EdgeResolver.from_settings(edge, members, p2p, spec.embedding_dim)
                self.edges[edge] = EdgeServer.from_settings(
                    edge, self.address(edge), members, init, fed, neighbours=neighbours, resolver=resolver,
                    checkpoint=ckpt / f"{edge}.json" if ckpt else None).start()
        self._network = SharedLoop(spec.handler_threads, name="clients") if spec.shared_network else OwnThreads()
        for cid, edge in spec.assignment.items():
            settings = spec.client.with_changes(client_id=cid, edge_id=edge, **spec.client_overrides.get(cid, {}))
            client = Client(settings, self.address(cid), spec.head_factory(), spec.class_of, spec.embedding_dim,
                            drafter=spec.drafter, network=self._network)
            self.clients[cid] = client
        # every client starts connecting at once; the broker takes them in turn (a thousand take seconds)
        timeout_s = max(10.0, 0.05 * len(self.clients))
        for client in self.clients.values():
            client.connect()
        for client in self.clients.values():
            client.wait_ready(timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="client")
        return self

    def run_round(self, round_: int, items: dict[str, Sequence[Any]], skip: set[str] | None = None
                  ) -> list[RoutedToken]:
        """Every client serves its items of this round (its own SLM drafts them), then, if federated, trains and
        syncs its head. Items may also be ready `TokenInput`s when the deployment has no drafter."""
        def serve(client: Client) -> list[RoutedToken]:
            mine = items.get(client.id, [])
            return client.serve_round(round_, mine) if client.drafter is not None else client.run_round(round_, mine)

        return [r for records in self.run_clients(round_, serve, skip).values() for r in records]

    def run_clients(self, round_: int, work: Callable[[Client], T], skip: set[str] | None = None) -> dict[str, T]:
        """Every client (but `skip`) does its `work` of this round side by side, then, if federated, trains and
        syncs its head; client id -> what its work returned."""
        assert self._pool is not None, "start() first"
        skip = skip or set()

        def one(cid: str) -> T:
            client = self.clients[cid]
            result = work(client)
            if self.spec.federated:
                client.finish_round(round_)
            return result

        futures = {cid: self._pool.submit(one, cid) for cid in self.clients if cid not in skip}
        return {cid: f.result() for cid, f in futures.items()}

    def byte_counts(self) -> ByteCounts:
        """Bytes at the clients' endpoints: what the IoT uplink and downlink carried."""
        counts = ByteCounts()
        for client in self.clients.values():
            counts.add(endpoint_bytes(client.endpoint))
        return counts

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for client in self.clients.values():  # every "offline" in flight at once, then each stop's flush is short
            _quietly(client.announce_offline)
        for client in self.clients.values():
            _quietly(client.stop)
        if self._network is not None:
            self._network.close()
        for edge in self.edges.values():
            _quietly(edge.stop)
        if self.cloud is not None:
            _quietly(self.cloud.stop)
        for worker in self.llm:
            _quietly(worker.stop)


def endpoint_bytes(endpoint: Endpoint) -> ByteCounts:
    stats = endpoint.stats()
    counts = ByteCounts()
    for kind in ("llm", "p2p", "fl"):
        counts.uplink[kind] = stats.sent_bytes.get(kind, 0)
        counts.downlink[kind] = stats.received_bytes.get(kind, 0)
        counts.messages_up[kind] = stats.sent_messages.get(kind, 0)
    return counts


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("error while stopping a role")
