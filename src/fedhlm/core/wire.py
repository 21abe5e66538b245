"""The version of the wire contract: every MQTT payload and every exported device bundle carries it.

It lives in the core because both sides of the contract need it: the transport's codec writes
and checks it on every payload, and a model export stamps it into the manifest a device
checks before it connects. Bump it with the AsyncAPI document and the golden vectors.
"""

SCHEMA_VERSION = 1
