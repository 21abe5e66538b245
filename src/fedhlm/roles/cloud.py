"""The cloud: FedAvg of the edge models into the global threshold model (retained on `global/model`)."""

from __future__ import annotations

from pathlib import Path

from fedhlm.core.aggregation import Params, make_aggregator
from fedhlm.core.settings import FederationSettings
from fedhlm.roles.aggregator import RoundAggregator
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import ThresholdModel


class CloudServer(RoundAggregator):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.update_filter = topics.global_update_filter()

    @classmethod
    def from_settings(cls, cloud_id: str, address: BrokerAddress, edges: list[str], init: Params,
                      fed: FederationSettings, *, checkpoint: Path | None = None, **kwargs) -> CloudServer:
        """The cloud as the federation section sets it up: it waits for every edge (quorum 1)."""
        return cls(cloud_id, address, edges, init, quorum=1.0, deadline_s=fed.round_deadline_s,
                   aggregator=make_aggregator(fed.aggregation, fed.trim_fraction), checkpoint=checkpoint,
                   max_weight_ratio=fed.max_weight_ratio, **kwargs)

    def unpack(self, inbound: Inbound) -> tuple[str, int, dict, int] | str:
        aggregate = inbound.message
        if not isinstance(aggregate, ThresholdModel) or aggregate.level != "edge":
            return "not an edge aggregate"
        topic_edge = topics.parse(inbound.topic).ids.get("edge_id")
        if aggregate.source_id != topic_edge:
            return f"aggregate of {aggregate.source_id} on the topic of {topic_edge}"
        return aggregate.source_id, aggregate.round, aggregate.params, aggregate.num_samples

    def on_round(self, round_: int, who: list[str]) -> None:
        model = ThresholdModel(self.id, "global", round_, self.num_samples, self.params)
        self.endpoint.publish(topics.global_model(), model, qos=1, retain=True)
