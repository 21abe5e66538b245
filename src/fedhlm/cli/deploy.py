"""`fedhlm deploy --config configs/deploy.yaml`: brokers, bridges and every role as its own process.

    fedhlm deploy                                   # configs/deploy.yaml: bridged sites, quick.yaml's federation
    fedhlm deploy --set topology=flat --set llm_workers=2 --set clients_per_process=1

It prints where each broker listens and each process runs (pid, log), waits for the clients to finish
their rounds, stops the servers and the brokers, and writes `<run_dir>/deploy.json`. Exit 0 when every
client finished, 1 when a process failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from fedhlm.simulation.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/deploy.yaml", help="deploy YAML (see configs/deploy.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a deploy setting; simulation settings go in the YAML's overrides list")
    parser.add_argument("--run-dir", default=None, help="where logs, credentials and deploy.json go")
    args = parser.parse_args(argv)
    from fedhlm.simulation.launcher import DeployConfig, Launcher

    extra = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"fedhlm deploy: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        extra[key] = yaml.safe_load(value)
    if args.run_dir:
        extra["run_dir"] = args.run_dir
    try:
        launcher = Launcher(DeployConfig.from_yaml(args.config, extra))
    except (ConfigError, FileNotFoundError, TypeError, ValueError) as exc:
        print(f"fedhlm deploy: {exc}", file=sys.stderr)
        return 2
    report = launcher.run()
    return {"complete": 0, "interrupted": 130}.get(report["status"], 1)
