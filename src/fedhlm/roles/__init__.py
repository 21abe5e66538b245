"""The roles of a FedHLM deployment. Each owns one MQTT endpoint and talks to the others only through it.

Names are imported on first use, so that a process running one role loads only what that
role needs (an edge or the cloud needs neither torch nor Lightning).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedhlm.roles.client import Client, ClientSettings, TokenInput
    from fedhlm.roles.cloud import CloudServer
    from fedhlm.roles.edge import EdgeServer
    from fedhlm.roles.llm_service import LLMService

_HOMES = {
    "Client": "client",
    "ClientSettings": "client",
    "TokenInput": "client",
    "CloudServer": "cloud",
    "EdgeServer": "edge",
    "LLMService": "llm_service",
}

__all__ = ["Client", "ClientSettings", "CloudServer", "EdgeServer", "LLMService", "TokenInput"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"fedhlm.roles.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'fedhlm.roles' has no attribute {name!r}")
