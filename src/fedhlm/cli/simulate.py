"""`fedhlm simulate`: the end-to-end run over Mosquitto, with the baselines, a JSON report and plots."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from fedhlm.simulation.config import ConfigError, load_config
from fedhlm.simulation.generation import simulate_generation
from fedhlm.simulation.run import simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set federation.clients=20 (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    parser.add_argument("--broker", default=None, help="use this broker (mqtt://user:pass@host:port) instead of a private one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tolerate-degraded", action="store_true",
                        help="exit 0 even when a method ran degraded (broker died, LLM fallbacks, missing models)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.broker:
        overrides.append(f"broker={args.broker}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"fedhlm simulate: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out or cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        print(f"fedhlm simulate: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    if cfg.broker:  # before minutes of data and model preparation
        from fedhlm.transport.address import BrokerAddress

        address = BrokerAddress.from_url(cfg.broker)
        unreachable = address.unreachable()
        if unreachable:
            print(f"fedhlm simulate: cannot reach the broker at {address.public_url}: {unreachable}", file=sys.stderr)
            return 1
    from fedhlm.data.reader import DataFileError

    try:
        run = simulate_generation if cfg.generation.enabled else simulate  # titles token by token, or classification
        report = run(cfg, out, show_progress=not args.no_progress)
    except (DataFileError, FileNotFoundError, ConnectionError) as exc:  # the report says "failed" too; no traceback
        # for a bad file or an LLM server (models.remote) that cannot be reached
        print(f"fedhlm simulate: {exc}", file=sys.stderr)
        return 1
    status = report["status"]
    if status == "degraded":
        print("fedhlm simulate: DEGRADED run (see the table and report.json 'degraded')", file=sys.stderr)
        return 0 if args.tolerate_degraded else 3
    return 0 if status == "complete" else 130 if status == "interrupted" else 1
