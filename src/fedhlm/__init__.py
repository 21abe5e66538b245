"""FedHLM: hybrid language models at the edge with federated offloading thresholds over MQTT."""

__version__ = "0.1.0"
