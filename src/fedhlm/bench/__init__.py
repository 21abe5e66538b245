"""`fedhlm bench <name>`: benchmarks that measure FedHLM's parts, one module each.

Each benchmark lives in `fedhlm.bench.<name>` with its own `main(argv) -> int`; modules
are imported only when asked for, so `fedhlm bench transport` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# benchmark -> help line
BENCHES: dict[str, str] = {
    "transport": "messages/s and request/response latency through Endpoint vs bare paho-mqtt",
    "scale": "simulation throughput as clients and edges grow",
    "device": "model inference speed on the available device",
    "llm": "verified tokens/s of each LLM backend (in process, remote server), directly and behind a worker",
    "heads": "which routing features carry the signal: linear/mlp heads on feature subsets vs the oracle",
}


def _usage() -> str:
    width = max(len(name) for name in BENCHES)
    lines = ["usage: fedhlm bench <name> [options]", "", "benchmarks:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, help_ in BENCHES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"fedhlm bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # the benchmark exists but one of its own imports is missing
        print(f"fedhlm bench {name}: not implemented yet", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
