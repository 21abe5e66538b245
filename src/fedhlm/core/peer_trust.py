"""Which peers a client still takes answers from: audits that catch a peer lying exclude it.

A peer passes on tokens the LLM resolved, so an honest peer's audited answer agrees with the LLM's
verdict on nearly every audit (0 of 14 disagreed on configs/reuse.yaml at 3 deliveries); a peer whose
audited answers mostly disagree is lying or broken. The identity counted here is the responder id of
the reply topic, which the broker binds to the peer's login (`pattern write .../p2p/reply/%u`), so an
excluded peer cannot come back under another name without other credentials. Pure state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PeerTrust:
    """Audit outcomes per responder; `exclude_after` disagreements that are also a majority exclude it
    (0: nobody is ever excluded)."""

    exclude_after: int = 3
    audits: Counter[str] = field(default_factory=Counter)
    disagreements: Counter[str] = field(default_factory=Counter)
    excluded: set[str] = field(default_factory=set)

    def record(self, responder: str, agreed: bool) -> bool:
        """Count one audit of `responder`'s answer; True when this audit excludes it."""
        self.audits[responder] += 1
        if not agreed:
            self.disagreements[responder] += 1
        wrong = self.disagreements[responder]
        if (self.exclude_after and responder not in self.excluded and wrong >= self.exclude_after
                and 2 * wrong > self.audits[responder]):
            self.excluded.add(responder)
            return True
        return False

    def trusted(self, responder: str) -> bool:
        return responder not in self.excluded
