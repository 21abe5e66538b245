"""`fedhlm bench transport`: what FedHLM's Endpoint costs over a bare paho-mqtt client.

Through a private Mosquitto (LocalBroker) started for the run, for payloads of about
100 B, 1 KB and 10 KB at QoS 0 and QoS 1, it measures

- one-way throughput: a ThresholdUpdate stream from client c0 to edge e0, counted where it
  is delivered (in e0's handler, after decoding), timed from the first publish to the last
  arrival. QoS 0 may drop under load, so received/sent is reported beside the rate;
- request/response round trips: TokenRequest -> LLMVerdict between c0 and an LLM worker,
  p50/p99 over `requests` calls after a short warm-up (the first call, which also
  subscribes to the reply topic, is reported apart);

and the same with bare paho-mqtt 2.x clients (VERSION2 callbacks, MQTT v5) sending raw
bytes of the same sizes on the same topics as the same users, in the same run. The ratio
is therefore FedHLM's own overhead: codec, validation, counters and the worker hand-off.
Everything runs in one process (publisher, subscriber and responder threads share the GIL),
so absolute numbers are lower than with one process per role.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedhlm.transport.broker import LocalBroker, find_mosquitto
from fedhlm.reporting.summary import percentile
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.endpoint import Endpoint, Inbound
from fedhlm.transport.messages import LLMVerdict, Message, ThresholdUpdate, TokenRequest

SIZES = (100, 1_000, 10_000)
QOS_LEVELS = (0, 1)
CLIENT, EDGE, LLM = "c0", "e0", "llm"
USERS = {CLIENT: "client", EDGE: "edge", LLM: "llm"}
WARMUP_REQUESTS = 3  # after the first one, which pays for the reply subscription
REQUEST_TIMEOUT_S = 5.0
QUIET_S = 2.0  # no arrival for this long after the last publish: the rest was dropped
QUICK_MESSAGES, QUICK_REQUESTS = 200, 10
NODELAY_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures. `bare_nodelay="auto"` gives the bare clients the Endpoint's TCP_NODELAY setting."""

    messages: int = 2000
    requests: int = 300
    sizes: tuple[int, ...] = SIZES
    qos_levels: tuple[int, ...] = QOS_LEVELS
    case_timeout_s: float = 60.0
    bare_nodelay: str = "auto"

    def __post_init__(self) -> None:
        if self.messages < 1:
            raise ValueError(f"messages: must be >= 1, got {self.messages}")
        if self.requests < 1:
            raise ValueError(f"requests: must be >= 1, got {self.requests}")
        if not self.sizes or any(size < 1 for size in self.sizes):
            raise ValueError(f"sizes: must be positive byte counts, got {list(self.sizes)}")
        if not self.qos_levels or any(qos not in (0, 1) for qos in self.qos_levels):
            raise ValueError(f"qos_levels: must be 0 and/or 1, got {list(self.qos_levels)}")
        if self.case_timeout_s <= 0:
            raise ValueError(f"case_timeout_s: must be > 0, got {self.case_timeout_s}")
        if self.bare_nodelay not in NODELAY_CHOICES:
            raise ValueError(f"bare_nodelay: must be one of {NODELAY_CHOICES}, got {self.bare_nodelay!r}")


# -- summaries (pure) ---------------------------------------------------------------


def throughput_summary(sent: int, received: int, seconds: float) -> dict[str, float | int]:
    """Delivered messages per second; received/sent shows what QoS 0 dropped."""
    return {
        "sent": sent,
        "received": received,
        "received_ratio": received / sent if sent else 0.0,
        "seconds": seconds,
        "msgs_per_s": received / seconds if seconds > 0 else 0.0,
    }


def latency_summary(samples_ms: Sequence[float], timeouts: int) -> dict[str, float | int]:
    """Round-trip percentiles in milliseconds over the requests that got a reply."""
    return {
        "count": len(samples_ms),
        "timeouts": timeouts,
        "p50_ms": percentile(samples_ms, 50),
        "p99_ms": percentile(samples_ms, 99),
        "mean_ms": float(np.mean(samples_ms)) if len(samples_ms) else 0.0,
        "max_ms": float(np.max(samples_ms)) if len(samples_ms) else 0.0,
    }


def format_table(cases: Sequence[dict[str, Any]]) -> str:
    """One row per payload size and QoS: throughput of both, their ratio, received/sent and RTT p50/p99."""
    header = ("size", "qos", "bytes msg/req", "fedhlm msg/s", "bare msg/s", "ratio",
              "fedhlm recv", "bare recv", "fedhlm rtt p50/p99 ms", "bare rtt p50/p99 ms")
    rows = [header]
    for case in cases:
        ours, bare = case["fedhlm"], case["bare"]
        rows.append((
            f"{case['size']} B", str(case["qos"]), f"{case['stream_bytes']}/{case['request_bytes']}",
            f"{ours['throughput']['msgs_per_s']:.0f}", f"{bare['throughput']['msgs_per_s']:.0f}",
            f"{case['throughput_ratio']:.2f}",
            f"{ours['throughput']['received']}/{ours['throughput']['sent']}",
            f"{bare['throughput']['received']}/{bare['throughput']['sent']}",
            f"{ours['rtt']['p50_ms']:.2f} / {ours['rtt']['p99_ms']:.2f}",
            f"{bare['rtt']['p50_ms']:.2f} / {bare['rtt']['p99_ms']:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# -- messages of a given size ------------------------------------------------------------


def _sized(build: Callable[[int], Message], target_bytes: int) -> Message:
    """`build(n)` with n array elements so that the encoded message is about `target_bytes`;
    never smaller than the message with one element. The element size is measured, not assumed
    (token ids take 2 bytes on the wire, float32 parameters 4)."""
    per_element = max(1.0, (len(encode(build(513))) - len(encode(build(1)))) / 512)
    n = 1
    for _ in range(3):  # the length prefixes grow with n: correct the estimate twice
        n = max(1, n + round((target_bytes - len(encode(build(n)))) / per_element))
    return build(n)


def sized_update(target_bytes: int) -> ThresholdUpdate:
    """The one-way stream's message: a client's threshold update with an n-element parameter."""
    def build(n: int) -> ThresholdUpdate:
        return ThresholdUpdate(client_id=CLIENT, edge_id=EDGE, round=0, num_samples=1,
                               params={"w": np.full(n, 0.5, dtype=np.float32)})
    return _sized(build, target_bytes)  # type: ignore[return-value]


def sized_request(target_bytes: int) -> TokenRequest:
    """The request: an uncertain token whose context has as many token ids as the size needs."""
    def build(n: int) -> TokenRequest:
        return TokenRequest(client_id=CLIENT, session_id="bench", seq=0, round=0,
                            context_ids=np.arange(n, dtype=np.int32) % 30_000 + 100, draft_token=2001,
                            topk_ids=[2001, 2002, 2003], topk_probs=[0.5, 0.2, 0.1], tail_mass=0.2,
                            features=[0.4, 0.6], reason="uncertain")
    return _sized(build, target_bytes)  # type: ignore[return-value]


def verdict_for(request: TokenRequest) -> LLMVerdict:
    """The reply an LLM worker sends for `request`."""
    return LLMVerdict(client_id=request.client_id, session_id=request.session_id, seq=request.seq, accepted=True,
                      final_token=request.draft_token, beta=1.0, q_draft=0.5, llm_ms=0.0, worker="llm")


# -- measuring ----------------------------------------------------------------------------


class _Arrivals:
    """Counts messages where they are delivered and remembers when the last one came."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self._cond = threading.Condition()

    def hit(self, *_: object) -> None:
        now = time.perf_counter()
        with self._cond:
            self.count += 1
            self.last = now
            if self.count >= self.expected:
                self._cond.notify_all()

    def wait(self, deadline: float) -> None:
        """Until every message arrived, none came for QUIET_S (the rest was dropped), or the deadline."""
        with self._cond:
            while self.count < self.expected:
                now = time.perf_counter()
                if now >= deadline:
                    return
                seen = self.count
                self._cond.wait(min(QUIET_S, deadline - now))
                if self.count == seen and time.perf_counter() - self.last >= QUIET_S:
                    return


def _time_calls(call: Callable[[], object], count: int, deadline: float) -> tuple[list[float], int]:
    """Milliseconds per successful call and the number that timed out; stops at the deadline."""
    samples: list[float] = []
    timeouts = 0
    for _ in range(count):
        if time.perf_counter() >= deadline:
            break
        start = time.perf_counter()
        try:
            call()
        except TimeoutError:
            timeouts += 1
            continue
        samples.append((time.perf_counter() - start) * 1e3)
    return samples, timeouts


def _set_nodelay(client: mqtt.Client, userdata: object, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def endpoint_nodelay(endpoint: Endpoint) -> bool | None:
    """Whether the Endpoint's connection has TCP_NODELAY (Nagle off); None if its socket is not reachable.

    Reads paho's socket behind the Endpoint: a diagnostic for the bench, not an API roles use.
    """
    sock = getattr(getattr(endpoint, "_client", None), "socket", lambda: None)()
    if not isinstance(sock, socket.socket):
        return None
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class BareClient:
    """A plain paho-mqtt 2.x MQTT v5 client (VERSION2 callbacks): connect, subscribe, publish bytes."""

    def __init__(self, address: BrokerAddress, client_id: str, *, nodelay: bool,
                 on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if nodelay:
            self.client.on_socket_open = _set_nodelay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        if on_message is not None:
            self.client.on_message = on_message
        self._address = address
        self._connected = threading.Event()
        self._subacked = threading.Event()
        self._refusal: str | None = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refusal = str(reason_code)
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if reason_codes[0].is_failure:
            self._refusal = f"subscription refused: {reason_codes[0]}"
        self._subacked.set()

    def start(self, timeout_s: float = 10.0) -> "BareClient":
        self.client.connect(self._address.host, self._address.port)
        self.client.loop_start()
        if not self._connected.wait(timeout_s) or self._refusal:
            raise ConnectionError(f"bare client: not connected ({self._refusal or 'timeout'})")
        return self

    def subscribe(self, topic_filter: str, qos: int, timeout_s: float = 10.0) -> None:
        self._subacked.clear()
        self.client.subscribe(topic_filter, qos=qos)
        if not self._subacked.wait(timeout_s) or self._refusal:
            raise ConnectionError(f"bare client: no SUBACK for {topic_filter!r} ({self._refusal or 'timeout'})")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def _closing(*parts: Endpoint | BareClient) -> Iterator[None]:
    try:
        yield
    finally:
        for part in parts:
            if isinstance(part, Endpoint):
                part.close(flush_timeout_s=1.0)
            else:
                part.close()


def fedhlm_throughput(broker: LocalBroker, message: Message, qos: int, count: int, timeout_s: float) -> dict[str, Any]:
    """`count` ThresholdUpdates c0 -> e0 through two Endpoints, counted in e0's handler."""
    arrivals = _Arrivals(count)
    receiver = Endpoint(broker.address(EDGE))
    sender = Endpoint(broker.address(CLIENT))
    with _closing(sender, receiver):
        receiver.subscribe(topics.edge_update_filter(EDGE), arrivals.hit, qos=qos)
        receiver.start().wait_connected()
        sender.start().wait_connected()
        topic = topics.edge_update(EDGE, CLIENT)
        start = time.perf_counter()
        sent = sum(1 for _ in range(count) if sender.publish(topic, message, qos=qos))
        published = time.perf_counter()
        arrivals.wait(start + timeout_s)
    return throughput_summary(sent, arrivals.count, arrivals.last - start) | {"publish_s": published - start}


def bare_throughput(broker: LocalBroker, payload: bytes, qos: int, count: int, timeout_s: float,
                    nodelay: bool) -> dict[str, Any]:
    """The same stream as raw bytes between two bare paho clients, counted in on_message."""
    arrivals = _Arrivals(count)
    receiver = BareClient(broker.address(EDGE), f"{EDGE}-bare", nodelay=nodelay, on_message=arrivals.hit)
    sender = BareClient(broker.address(CLIENT), f"{CLIENT}-bare", nodelay=nodelay)
    with _closing(sender, receiver):
        receiver.start().subscribe(topics.edge_update_filter(EDGE), qos)
        sender.start()
        topic = topics.edge_update(EDGE, CLIENT)
        start = time.perf_counter()
        sent = sum(1 for _ in range(count) if sender.client.publish(topic, payload, qos=qos).rc == mqtt.MQTT_ERR_SUCCESS)
        published = time.perf_counter()
        arrivals.wait(start + timeout_s)
    return throughput_summary(sent, arrivals.count, arrivals.last - start) | {"publish_s": published - start}


def fedhlm_rtt(broker: LocalBroker, request: TokenRequest, qos: int, count: int, timeout_s: float) -> dict[str, Any]:
    """`count` Endpoint.request calls c0 -> llm -> c0; the LLM side answers from its handler."""
    responder = Endpoint(broker.address(LLM))
    requester = Endpoint(broker.address(CLIENT))

    def answer(inbound: Inbound) -> None:
        responder.reply(inbound, verdict_for(inbound.message), qos=qos)  # type: ignore[arg-type]

    with _closing(requester, responder):
        responder.subscribe(topics.llm_request(), answer, qos=qos)
        responder.start().wait_connected()
        requester.start().wait_connected()
        reply_topic = topics.client_llm_reply(CLIENT)

        def call() -> None:
            requester.request(topics.llm_request(), request, reply_topic, timeout_s=REQUEST_TIMEOUT_S, qos=qos)

        deadline = time.perf_counter() + timeout_s
        first, _ = _time_calls(call, 1, deadline)  # includes SUBSCRIBE + SUBACK of the reply topic
        _time_calls(call, WARMUP_REQUESTS, deadline)
        samples, timeouts = _time_calls(call, count, deadline)
        nodelay = endpoint_nodelay(requester)
    return latency_summary(samples, timeouts) | {"first_ms": first[0] if first else None, "tcp_nodelay": nodelay}


def bare_rtt(broker: LocalBroker, request_bytes: int, reply_bytes: int, qos: int, count: int, timeout_s: float,
             nodelay: bool) -> dict[str, Any]:
    """The same round trip with bare paho: Response Topic + Correlation Data, the responder echoes from on_message."""
    reply_payload = bytes(reply_bytes)
    waiting: dict[bytes, threading.Event] = {}

    def answer(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic, reply_payload, qos=qos, properties=props)

    def receive(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        event = waiting.get(getattr(msg.properties, "CorrelationData", b""))
        if event is not None:
            event.set()

    responder = BareClient(broker.address(LLM), f"{LLM}-bare", nodelay=nodelay, on_message=answer)
    requester = BareClient(broker.address(CLIENT), f"{CLIENT}-bare", nodelay=nodelay, on_message=receive)
    reply_topic = topics.client_llm_reply(CLIENT)
    payload = bytes(request_bytes)

    def call() -> None:
        correlation = uuid.uuid4().bytes
        waiting[correlation] = event = threading.Event()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        requester.client.publish(topics.llm_request(), payload, qos=qos, properties=props)
        try:
            if not event.wait(REQUEST_TIMEOUT_S):
                raise TimeoutError(f"no bare reply within {REQUEST_TIMEOUT_S} s")
        finally:
            del waiting[correlation]

    with _closing(requester, responder):
        responder.start().subscribe(topics.llm_request(), qos)
        requester.start().subscribe(reply_topic, qos)
        deadline = time.perf_counter() + timeout_s
        _time_calls(call, 1 + WARMUP_REQUESTS, deadline)
        samples, timeouts = _time_calls(call, count, deadline)
    return latency_summary(samples, timeouts) | {"tcp_nodelay": nodelay}


# -- the run --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores, load, Python, paho and Mosquitto versions."""
    try:
        banner = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5).stdout
        mosquitto = (re.search(r"version (\S+)", banner) or [None, None])[1]
    except (OSError, subprocess.SubprocessError):
        mosquitto = None
    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "mosquitto": mosquitto,
        "platform": platform.platform(),
    }


def _broker_nodelay(broker: LocalBroker) -> bool:
    return bool(re.search(r"^\s*set_tcp_nodelay\s+true\b", broker.config_file.read_text(), re.MULTILINE))


def _probe_endpoint_nodelay(broker: LocalBroker) -> bool:
    probe = Endpoint(broker.address(CLIENT), client_id=f"{CLIENT}-probe")
    with _closing(probe):
        probe.start().wait_connected()
        return bool(endpoint_nodelay(probe))


def run(config: BenchConfig, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every case of `config` against one private broker; the result is plain JSON-able data."""
    cases: list[dict[str, Any]] = []
    total = len(config.sizes) * len(config.qos_levels)
    started = time.time()
    machine = machine_info()
    with LocalBroker(USERS) as broker:
        fedhlm_nodelay = _probe_endpoint_nodelay(broker)
        bare_nodelay = {"auto": fedhlm_nodelay, "on": True, "off": False}[config.bare_nodelay]
        for size in config.sizes:
            update, request = sized_update(size), sized_request(size)
            stream_payload = encode(update)
            request_bytes, reply_bytes = len(encode(request)), len(encode(verdict_for(request)))
            for qos in config.qos_levels:
                timeout = config.case_timeout_s
                ours = {
                    "throughput": fedhlm_throughput(broker, update, qos, config.messages, timeout),
                    "rtt": fedhlm_rtt(broker, request, qos, config.requests, timeout),
                }
                bare = {
                    "throughput": bare_throughput(broker, bytes(len(stream_payload)), qos, config.messages, timeout,
                                                  bare_nodelay),
                    "rtt": bare_rtt(broker, request_bytes, reply_bytes, qos, config.requests, timeout, bare_nodelay),
                }
                bare_rate = bare["throughput"]["msgs_per_s"]
                case = {
                    "size": size, "qos": qos, "stream_bytes": len(stream_payload),
                    "request_bytes": request_bytes, "reply_bytes": reply_bytes,
                    "fedhlm": ours, "bare": bare,
                    "throughput_ratio": ours["throughput"]["msgs_per_s"] / bare_rate if bare_rate else 0.0,
                }
                cases.append(case)
                progress(
                    f"[{len(cases)}/{total}] {size} B qos{qos}: "
                    f"fedhlm {ours['throughput']['msgs_per_s']:.0f} msg/s, rtt p50 {ours['rtt']['p50_ms']:.2f} ms; "
                    f"bare {bare_rate:.0f} msg/s, rtt p50 {bare['rtt']['p50_ms']:.2f} ms"
                )
        setup = {
            "process": "one process: publisher, subscriber and responder threads share the GIL",
            "broker": f"private Mosquitto (LocalBroker) at {broker.host}",
            "broker_tcp_nodelay": _broker_nodelay(broker),
            "fedhlm_tcp_nodelay": fedhlm_nodelay,
            "bare_tcp_nodelay": bare_nodelay,
            "stream": f"ThresholdUpdate {CLIENT} -> {EDGE} on {topics.edge_update(EDGE, CLIENT)}",
            "request": f"TokenRequest -> LLMVerdict, {CLIENT} -> {LLM} -> {CLIENT}",
            "warmup_requests": 1 + WARMUP_REQUESTS,
        }
    machine["load_avg_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "bench": "transport",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "config": asdict(config),
        "machine": machine,
        "setup": setup,
        "cases": cases,
    }


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _pick(given: int | None, default: int) -> int:
    return default if given is None else given


def main(argv: list[str] | None = None) -> int:
    """`fedhlm bench transport`: Endpoint vs bare paho-mqtt throughput and round trips on a private broker."""
    parser = argparse.ArgumentParser(prog="fedhlm bench transport", description=main.__doc__)
    parser.add_argument("--messages", type=int, default=None,
                        help=f"messages per throughput case (default {BenchConfig.messages}; --quick: {QUICK_MESSAGES})")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"timed requests per latency case (default {BenchConfig.requests}; --quick: {QUICK_REQUESTS})")
    parser.add_argument("--sizes", type=_int_list, default=SIZES, help="payload sizes in bytes (default 100,1000,10000)")
    parser.add_argument("--qos", type=_int_list, default=QOS_LEVELS, help="QoS levels (default 0,1)")
    parser.add_argument("--quick", action="store_true", help="a short run for smoke tests")
    parser.add_argument("--case-timeout", type=float, default=BenchConfig.case_timeout_s,
                        help="seconds each measurement may take at most")
    parser.add_argument("--bare-nodelay", choices=NODELAY_CHOICES, default="auto",
                        help="TCP_NODELAY on the bare clients (auto: as the Endpoint has it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file to write (default runs/bench-transport-<timestamp>.json)")
    args = parser.parse_args(argv)
    try:
        config = BenchConfig(
            messages=_pick(args.messages, QUICK_MESSAGES if args.quick else BenchConfig.messages),
            requests=_pick(args.requests, QUICK_REQUESTS if args.quick else BenchConfig.requests),
            sizes=args.sizes, qos_levels=args.qos, case_timeout_s=args.case_timeout, bare_nodelay=args.bare_nodelay,
        )
    except ValueError as err:
        parser.error(str(err))
    out = args.out or Path("runs") / f"bench-transport-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run(config, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result["cases"]))
    print(f"({result['machine']['cpu_count']} cores, load {result['machine']['load_avg_1m']:.2f}; "
          f"TCP_NODELAY fedhlm={result['setup']['fedhlm_tcp_nodelay']} bare={result['setup']['bare_tcp_nodelay']} "
          f"broker={result['setup']['broker_tcp_nodelay']})")
    print(f"wrote {out}")
    return 0
