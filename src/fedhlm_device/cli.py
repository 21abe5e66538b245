"""`fedhlm-device`: run one SLM client on a device against an edge (see docs/device.md).

Reads inputs (a CSV of label,title,description or a text file, one input a line), drafts
them with the exported SLM, routes them round by round like `fedhlm client`, trains the
head locally and prints one JSON line per round (routes, accuracy where labels are known,
tau, bytes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedhlm_device.config import DeviceConfig, load_config
from fedhlm_device.prompt import prompt_text

log = logging.getLogger("fedhlm_device")


def read_inputs(path: str) -> Iterator[tuple[int, str]]:
    """(label or -1, prompt text) per input: CSV rows `label,title,description` (labels 1..4) or plain lines."""
    text = sys.stdin.read() if path == "-" else Path(path).expanduser().read_text(encoding="utf-8")
    if path.endswith(".csv"):
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if len(row) < 2:
                raise ValueError(f"{path}:{n}: expected label,title[,description]")
            try:
                label = int(row[0]) - 1
            except ValueError:
                raise ValueError(f"{path}:{n}: label {row[0]!r} is not an integer") from None
            description = row[2] if len(row) > 2 else ""
            yield label, prompt_text(row[1].replace("\\n", " "), description.replace("\\n", " "))
    else:
        for line in text.splitlines():
            if line.strip():
                yield -1, line.strip()


def run(config: DeviceConfig) -> int:
    from fedhlm_device.client import DeviceClient
    from fedhlm_device.runtime import ExportedSLM

    t0 = time.perf_counter()
    slm = ExportedSLM(config.model, config.precision, threads=config.threads)
    client = DeviceClient(config.device_settings(), config.address(), slm.head(), slm.class_of)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    client.start()
    log.info("ready in %.2f s (model %s, %s)", time.perf_counter() - t0, config.model, config.precision)
    inputs = list(read_inputs(config.inputs)) if config.inputs else []
    rng = np.random.default_rng([client.s.seed, 7])
    first = client.current_round()
    try:
        for r in range(first, first + config.rounds):
            chunk = inputs[(r - first) * config.per_round : (r - first + 1) * config.per_round]
            if stop["now"] or (inputs and not chunk):
                break
            start = time.perf_counter()
            uids = range(r * 100_000, r * 100_000 + len(chunk))
            drafted = slm.token_inputs([t for _, t in chunk], uids, rng)
            slm_ms = (time.perf_counter() - start) * 1000.0 / max(1, len(chunk))
            records = client.run_round(r, drafted, slm_ms)
            client.finish_round(r)
            label_of = {uid: label for uid, (label, _) in zip(uids, chunk)}  # the client itself never sees labels
            labelled = [t for t in records if label_of[t.uid] >= 0]
            stats = client.endpoint.stats()
            print(json.dumps({
                "round": r, "inputs": len(records), "routes": dict(Counter(t.route for t in records)),
                "accuracy": sum(t.final == label_of[t.uid] for t in labelled) / len(labelled) if labelled else None,
                "tau": client.head.effective_tau(), "slm_ms": round(slm_ms, 3),
                "sent_bytes": stats.sent_bytes, "received_bytes": stats.received_bytes,
            }), flush=True)
    finally:
        client.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm-device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", help="mqtt[s]://[user[:password]@]host[:port] (env FEDHLM_BROKER)")
    parser.add_argument("--id", help="client id, also the MQTT username by default (env FEDHLM_ID)")
    parser.add_argument("--edge", help="edge id of this client's cluster (env FEDHLM_EDGE)")
    parser.add_argument("--model", help="folder written by `fedhlm export` (env FEDHLM_MODEL)")
    parser.add_argument("--config", help="YAML file with these keys and the routing:/federation:/p2p: sections")
    parser.add_argument("--precision", choices=["fp32", "int8"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--ca-certs", dest="ca_certs")
    parser.add_argument("--inputs", help="CSV (label,title,description) or text file; '-' reads stdin")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--per-round", dest="per_round", type=int)
    parser.add_argument("--state-dir", dest="state_dir", help="where the outbox lives (default ~/.fedhlm-device)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO if args.pop("verbose") else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config_path = args.pop("config")
    try:
        config = load_config(config_path, args)
        return run(config)
    except (ValueError, OSError, TimeoutError, ConnectionRefusedError) as err:
        print(f"fedhlm-device: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
