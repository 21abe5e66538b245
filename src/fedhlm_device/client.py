"""DeviceClient: `fedhlm.roles.client.Client` for a device, on the same topics and payloads, without torch.

The routing, the protocol and the accounting are the Python client's own code (this is a
subclass, and `roles.client` imports no torch). What differs is what a device has: the
SLM runs through ONNX Runtime (`ExportedSLM.token_inputs`), the head is the numpy
`ScalarHead` trained by plain SGD, there is no sentence-transformers (P2P works only with
embeddings the caller supplies, else it is off), and an update goes through an on-disk
`Outbox`: written before publish, removed on PUBACK, resent at start, so it survives a
power cut.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings, from_mapping
from fedhlm.roles.client import Client
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.messages import ThresholdUpdate
from fedhlm_device.head import ScalarHead
from fedhlm_device.outbox import Outbox

log = logging.getLogger(__name__)

__all__ = ["DeviceClient", "DeviceSettings", "TokenInput"]


@dataclass
class DeviceSettings(ClientSettings):
    """ClientSettings plus the folder that keeps the outbox."""

    state_dir: str | None = None  # outbox lives in <state_dir>/outbox; None: no outbox (tests, simulations)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.routing.optimizer != "sgd":
            raise ValueError(f"routing.optimizer: a device trains its head with 'sgd' only, got {self.routing.optimizer!r}")
        if self.routing.head != "scalar" or self.routing.features != "basic":
            raise ValueError(f"routing.head / routing.features: a device runs the scalar head on the basic features, "
                             f"got {self.routing.head!r} on {self.routing.features!r}")

    @classmethod
    def from_sections(cls, sections: dict, **changes: object) -> "DeviceSettings":
        """From the YAML sections a simulation and `fedhlm client` read (`routing:`, `federation:`, `p2p:`) plus
        top-level setting names (`policy`, `seed`, ...); an unknown name is an error naming it."""
        values = dict(sections)
        config = SimpleNamespace(seed=values.pop("seed", 0), **{
            name: from_mapping(kind, values.pop(name, None), name)
            for name, kind in (("routing", RoutingSettings), ("federation", FederationSettings), ("p2p", P2PSettings))})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown device settings {unknown}")
        return cls.from_config(config, **{**values, **changes})


class DeviceClient(Client):
    """One device: a Client with a numpy head and an on-disk outbox for its updates."""

    def __init__(self, settings: DeviceSettings, address: BrokerAddress, head: ScalarHead,
                 class_of: Callable[[int], int], embedding_dim: int = 384) -> None:
        super().__init__(settings, address, head, class_of, embedding_dim)
        self.outbox = Outbox(Path(settings.state_dir) / "outbox") if settings.state_dir else None
        self.updates_resent = 0

    def start(self, timeout_s: float = 10.0) -> "DeviceClient":
        super().start(timeout_s)
        self.resend_outbox()
        return self

    def stop(self) -> None:
        if self.outbox is not None and self.endpoint.flush(2.0):
            for entry in self.outbox.pending():  # every QoS 1 message was acknowledged meanwhile
                self.outbox.remove(entry.path)
        super().stop()

    def send_update(self, update: ThresholdUpdate) -> None:
        """QoS 1 through the outbox: on disk first, removed once the broker acknowledged it."""
        topic = topics.edge_update(self.s.edge_id, self.id)
        entry = self.outbox.put(topic, encode(update)) if self.outbox is not None else None
        self.counters.updates_sent += 1
        self._publish_acked(topic, update, entry)

    def resend_outbox(self) -> int:
        """Publish what a previous run left unacknowledged; returns how many."""
        if self.outbox is None:
            return 0
        entries = self.outbox.pending()
        for entry in entries:
            log.info("%s: resending %s from the outbox", self.id, entry.path.name)
            self.updates_resent += 1
            self._publish_acked(entry.topic, entry.message, entry.path)
        return len(entries)

    def _publish_acked(self, topic: str, message: ThresholdUpdate, entry: Path | None) -> None:
        try:
            self.endpoint.publish(topic, message, qos=1, wait=entry is not None, timeout_s=self.s.federation.client_wait_s)
        except TimeoutError:
            log.warning("%s: no PUBACK for %s yet; it stays in the outbox", self.id, topic)
            return
        if entry is not None and self.outbox is not None:
            self.outbox.remove(entry)
