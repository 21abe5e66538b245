"""The methods a simulation compares, in one registry that config validation and `simulate` both read.

A method is a routing policy plus whether peers are asked; the static HLM also takes its
threshold from the calibration split. Adding a baseline is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhlm.core.policies import policy_class


@dataclass(frozen=True)
class Method:
    name: str
    policy: str  # a name in core.policies.POLICIES
    p2p: bool = False
    calibrated: bool = False  # its threshold is U-HLM's, fitted on the calibration split

    @property
    def needs_network(self) -> bool:
        """False when nothing is ever sent: the method runs without a broker."""
        return policy_class(self.policy).sends

    @property
    def federated(self) -> bool:
        return policy_class(self.policy).federated


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("slm_only", "never"),
    Method("llm_only", "always"),
    Method("static_hlm", "static", calibrated=True),
    Method("fedhlm_no_p2p", "learned"),
    Method("fedhlm", "learned", p2p=True),
)}
METHOD_NAMES = tuple(METHODS)
