"""FedHLM's client for MQTT-capable devices: the SLM through ONNX Runtime, everything else in numpy.

Importing this package never imports torch, Lightning or transformers: a device installs
`fedhlm[device]` (onnxruntime, tokenizers, numpy, paho-mqtt, msgpack, pyyaml) and runs a
folder written by `fedhlm export`. It speaks the same topics and payloads as
`fedhlm.roles.client.Client` through the same torch-free `fedhlm.transport`.
"""

from fedhlm_device.client import DeviceClient, DeviceSettings, TokenInput
from fedhlm_device.features import FEATURE_NAMES, features, route_view, topk_compress
from fedhlm_device.head import ScalarHead, fit_sgd, routing_loss
from fedhlm_device.outbox import Outbox
from fedhlm_device.prompt import PromptEncoder
from fedhlm_device.runtime import ExportedSLM

__all__ = [
    "FEATURE_NAMES", "DeviceClient", "DeviceSettings", "ExportedSLM", "Outbox", "PromptEncoder", "ScalarHead",
    "TokenInput", "features", "fit_sgd", "route_view", "routing_loss", "topk_compress",
]
