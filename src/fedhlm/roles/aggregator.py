"""What the edge server and the cloud share: collect updates over MQTT, close rounds, checkpoint.

An aggregator subscribes to its update topic (QoS 1, persistent session, so updates sent
while it is restarting wait at the broker), checks every update (finite, in range, same
shape as its model), feeds a `RoundCollector` and closes a round when it is complete or
when the deadline passed with a quorum. Participants known to be offline (their Last Will
said so, see `set_presence`) are not waited for: once every other one has reported and
they make a quorum, the round closes without waiting for the deadline. What happens with
the aggregate is the subclass's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedhlm.core.aggregation import Aggregator, Params, WeightedParams, check_params, fedavg
from fedhlm.core.rounds import RoundCollector, ServerState, load_state, save_state
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.network import Network, OwnThreads

log = logging.getLogger(__name__)


class RoundAggregator:
    """Base of EdgeServer and CloudServer; subclasses set `update_filter` and implement `on_round`."""

    update_filter: str = ""

    def __init__(
        self,
        role_id: str,
        address: BrokerAddress,
        participants: list[str],
        initial_params: Params,
        *,
        quorum: float = 0.75,
        deadline_s: float = 20.0,
        aggregator: Aggregator = fedavg,
        checkpoint: str | Path | None = None,
        max_abs: float = 1e3,
        max_samples: int | None = None,
        max_weight_ratio: float = 0.0,
        tick_s: float = 0.02,
        network: Network | None = None,
    ) -> None:
        self.id = role_id
        self.params: Params = {k: np.asarray(v, np.float32) for k, v in initial_params.items()}
        self.num_samples = 0
        self.aggregator = aggregator  # bound once by the configuration (`make_aggregator`)
        self.max_abs = max_abs
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.collector = RoundCollector(set(participants), quorum=quorum, deadline_s=deadline_s,
                                        opened_at=time.monotonic(), max_samples=max_samples,
                                        max_weight_ratio=max_weight_ratio)
        self.history: list[dict] = []
        self.round_hooks: list[Callable[[dict], None]] = []  # called with each closed round's history entry
        self.rejected: Counter[str] = Counter()  # reason -> count
        self.duplicates = 0
        self.updates_accepted = 0
        self.absent: set[str] = set()  # participants whose status says offline
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick_s = tick_s
        self._restore()
        self.endpoint = (network or OwnThreads()).endpoint(address, persistent=True)
        self._thread = threading.Thread(target=self._loop, name=f"agg-{role_id}", daemon=True)

    # -- life cycle ----------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "RoundAggregator":
        self.endpoint.subscribe(self.update_filter, self._on_update, qos=1)
        self.subscribe_extra()
        self.endpoint.start().wait_connected(timeout_s)
        self._thread.start()
        return self

    def subscribe_extra(self) -> None:
        """Further subscriptions of a subclass (made before connecting)."""

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.endpoint.flush(2.0)
        self.endpoint.close()

    @property
    def round(self) -> int:
        return self.collector.round

    # -- updates -------------------------------------------------------------------
    def _on_update(self, inbound: Inbound) -> None:
        unpacked = self.unpack(inbound)
        if isinstance(unpacked, str):
            self.rejected[unpacked] += 1
            log.warning("%s: dropped a message on %s: %s", self.id, inbound.topic, unpacked)
            return
        sender, round_, params, num_samples = unpacked
        reason = check_params(params, self.params, max_abs=self.max_abs)
        if reason:
            self.rejected[reason] += 1
            log.warning("%s: rejected update of %s for round %d: %s", self.id, sender, round_, reason)
            return
        with self._lock:
            outcome = self.collector.add(sender, round_, WeightedParams(params, num_samples), now=time.monotonic())
            self.absent.discard(sender)  # it is evidently alive, whatever its last status said
        if outcome == "accepted":
            self.updates_accepted += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        else:
            self.rejected[outcome] += 1
            log.info("%s: %s update from %s for round %d (at round %d)", self.id, outcome, sender, round_,
                     self.collector.round)

    def unpack(self, inbound: Inbound) -> tuple[str, int, Params, int] | str:
        """(sender, round, params, samples) of an update, or why it is not one we take."""
        raise NotImplementedError

    def set_presence(self, participant: str, online: bool) -> None:
        """Record a participant going offline (its Last Will) or coming back."""
        if participant not in self.collector.participants:
            return
        with self._lock:
            changed = (participant in self.absent) == online
            if online:
                self.absent.discard(participant)
            else:
                self.absent.add(participant)
        if changed:
            log.info("%s: %s is %s", self.id, participant, "online" if online else "offline")

    # -- rounds --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.step(time.monotonic())
            except Exception:
                log.exception("%s: round step failed", self.id)

    def step(self, now: float) -> bool:
        """Close the open round if it may close; True when it did."""
        with self._lock:
            c = self.collector
            # past twice the deadline without a quorum: close with whatever came, never block forever
            starving = c.waited(now) >= 2 * c.deadline_s and bool(c.received)
            if not (c.ready(now) or starving or self._present_reported()):
                return False
            round_ = c.round
            params, samples, who = c.close(now, self.aggregator)
        if params is not None:
            self.params, self.num_samples = params, samples
        self.history.append({"round": round_, "participants": who, "samples": samples,
                             "tau": float(np.ravel(self.params.get("tau", [np.nan]))[0])})
        log.info("%s: round %d closed with %d of %d participants (%d samples), tau %.4f", self.id, round_, len(who),
                 len(self.collector.participants), samples, self.history[-1]["tau"])
        self.on_round(round_, who)
        self._save()
        for hook in self.round_hooks:
            hook(self.history[-1])
        return True

    def _present_reported(self) -> bool:
        """Everyone not known offline has reported and they make a quorum: the deadline would add nothing."""
        c = self.collector
        got = c.received
        if not self.absent or len(got) < c.quorum_count:
            return False
        return all(p in got for p in c.participants - self.absent)

    def on_round(self, round_: int, who: list[str]) -> None:
        raise NotImplementedError

    # -- checkpoints ---------------------------------------------------------------
    def _save(self) -> None:
        if self.checkpoint is not None:
            save_state(self.checkpoint, ServerState(self.collector.round, self.params, self.num_samples, self.history))

    def _restore(self) -> None:
        if self.checkpoint is None:
            return
        state = load_state(self.checkpoint)
        if state is None:
            return
        self.collector.round = state.round
        if state.params is not None:
            self.params = state.params
        self.num_samples = state.num_samples
        self.history = state.history
        log.info("%s: resumed at round %d from %s", self.id, state.round, self.checkpoint)
