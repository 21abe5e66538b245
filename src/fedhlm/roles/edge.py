"""The edge server: FedAvg of its cluster's threshold heads every round; every E rounds, a cloud round.

After a cluster round it publishes the cluster model (retained, QoS 1) on
`edge/{id}/model`. Every `cloud_every` rounds it first sends its aggregate to the cloud and
waits (bounded) for the global model, which then becomes the cluster model it publishes
(HierFAVG). With `p2p_scope="neighbours"` it forwards peer queries that its own cluster
could not answer to the other edges. With a `resolver` it keeps the cluster's semantic cache
(`roles.edge_cache`). It follows its clients' retained status (online, or
offline by Last Will) so that a round does not wait out the deadline for a dead client.
"""

from __future__ import annotations

import logging
import threading
import time

from pathlib import Path

import numpy as np

from fedhlm.core.aggregation import Params, make_aggregator
from fedhlm.core.settings import FederationSettings
from fedhlm.roles.aggregator import RoundAggregator
from fedhlm.roles.edge_cache import EdgeResolver
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import ClientStatus, PeerQuery, ThresholdModel, ThresholdUpdate

log = logging.getLogger(__name__)


class EdgeServer(RoundAggregator):
    def __init__(self, *args, cloud_every: int = 2, global_wait_s: float = 30.0, neighbours: list[str] | None = None,
                 resolver: EdgeResolver | None = None, **kwargs) -> None:
        """`resolver`: the cluster's semantic cache (clients with `p2p.resolver: edge` send their uncertain
        tokens through it)."""
        super().__init__(*args, **kwargs)
        self.resolver = resolver
        self.update_filter = topics.edge_update_filter(self.id)
        self.cloud_every = cloud_every
        self.global_wait_s = global_wait_s
        self.neighbours = list(neighbours or [])
        self.forwarded = 0
        self._global: ThresholdModel | None = None
        self._global_cv = threading.Condition()
        self.cloud_rounds = 0


    @classmethod
    def from_settings(cls, edge_id: str, address: BrokerAddress, members: list[str], init: Params,
                      fed: FederationSettings, *, neighbours: list[str] | None = None,
                      checkpoint: Path | None = None, **kwargs) -> EdgeServer:
        """An edge as the federation section sets it up (a simulation and `fedhlm edge` alike)."""
        return cls(edge_id, address, members, init, quorum=fed.quorum, deadline_s=fed.round_deadline_s,
                   aggregator=make_aggregator(fed.aggregation, fed.trim_fraction), cloud_every=fed.cloud_every,
                   global_wait_s=3 * fed.round_deadline_s, neighbours=neighbours, checkpoint=checkpoint,
                   max_samples=fed.max_update_samples, max_weight_ratio=fed.max_weight_ratio, **kwargs)

    def unpack(self, inbound: Inbound) -> tuple[str, int, dict, int] | str:
        update = inbound.message
        if not isinstance(update, ThresholdUpdate):
            return "not a threshold update"
        topic_client = topics.parse(inbound.topic).ids.get("client_id")
        if update.client_id != topic_client or update.edge_id != self.id:
            return f"update for {update.client_id}@{update.edge_id} on the topic of {topic_client}@{self.id}"
        return update.client_id, update.round, update.params, update.num_samples

    def subscribe_extra(self) -> None:
        self.endpoint.subscribe(topics.global_model(), self._on_global, qos=1, always_retained=True)
        for client_id in sorted(self.collector.participants):
            self.endpoint.subscribe(topics.client_status(client_id), self._on_status, qos=1)
        if self.neighbours:
            self.endpoint.subscribe(topics.edge_p2p_query(self.id), self._on_peer_query, qos=0)
        if self.resolver is not None:
            self.resolver.attach(self.endpoint)

    def _on_status(self, inbound: Inbound) -> None:
        status = inbound.message
        topic_client = topics.parse(inbound.topic).ids.get("client_id")
        if not isinstance(status, ClientStatus) or status.client_id != topic_client:
            self.rejected["bad status"] += 1
            log.warning("%s: dropped a status on %s: not the status of %s", self.id, inbound.topic, topic_client)
            return
        if status.edge_id != self.id:
            # the client says it belongs to another edge: a retained status left by an earlier run (or deployment)
            # that assigned it elsewhere; it says nothing about this cluster's round
            self.rejected["other edge's status"] += 1
            log.info("%s: ignored %s's status for edge %s", self.id, status.client_id, status.edge_id)
            return
        self.set_presence(status.client_id, status.online)

    def _on_global(self, inbound: Inbound) -> None:
        model = inbound.message
        if isinstance(model, ThresholdModel) and model.level == "global":
            with self._global_cv:
                if self._global is None or model.round >= self._global.round:
                    self._global = model
                self._global_cv.notify_all()

    def _wait_global(self, cloud_round: int) -> ThresholdModel | None:
        deadline = time.monotonic() + self.global_wait_s
        with self._global_cv:
            while self._global is None or self._global.round < cloud_round:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._global_cv.wait(min(remaining, 0.1))
            return self._global

    def on_round(self, round_: int, who: list[str]) -> None:
        if (round_ + 1) % self.cloud_every == 0:
            cloud_round = (round_ + 1) // self.cloud_every - 1
            aggregate = ThresholdModel(self.id, "edge", cloud_round, self.num_samples, self.params)
            self.endpoint.publish(topics.global_update(self.id), aggregate, qos=1)
            model = self._wait_global(cloud_round)
            if model is None:
                log.warning("%s: no global model for cloud round %d; publishing the cluster model", self.id,
                            cloud_round)
            else:
                self.params = {k: np.asarray(v, np.float32) for k, v in model.params.items()}
                self.cloud_rounds += 1
                self.history[-1]["global_tau"] = float(np.ravel(self.params["tau"])[0])
        model = ThresholdModel(self.id, "edge", round_, self.num_samples, self.params)
        self.endpoint.publish(topics.edge_model(self.id), model, qos=1, retain=True)

    def _on_peer_query(self, inbound: Inbound) -> None:
        """Forward a query that the asking client marked for neighbours (hops == 1)."""
        q = inbound.message
        if not isinstance(q, PeerQuery) or q.hops != 1 or not inbound.response_topic:
            return
        forwarded = PeerQuery(q.client_id, q.edge_id, q.seq, q.model_name, q.embedding, 2, q.delta)
        for edge in self.neighbours:
            self.endpoint.forward(topics.edge_p2p_query(edge), forwarded, inbound)
            self.forwarded += 1
