"""The roles of a FedHLM deployment. Each owns one MQTT endpoint and talks to the others only through it."""

from fedhlm.roles.client import Client, ClientSettings, TokenInput
from fedhlm.roles.cloud import CloudServer
from fedhlm.roles.edge import EdgeServer
from fedhlm.roles.llm_service import LLMService

__all__ = ["Client", "ClientSettings", "CloudServer", "EdgeServer", "LLMService", "TokenInput"]
