"""The `fedhlm` command: a thin dispatcher to the module that owns each subcommand.

Each subcommand lives in the module named for it and exposes ``main(argv) -> int``;
imports are lazy so that `fedhlm broker` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

from fedhlm.core.termination import request_termination

# subcommand -> (module, help line)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("fedhlm.cli.broker", "start a private Mosquitto in the foreground and print its URL and credentials"),
    "bench": ("fedhlm.bench", "benchmarks: `fedhlm bench transport|scale|device|heads|llm`"),
    "fit": ("fedhlm.cli.lightning", "train a model with the Lightning CLI (--config configs/<file>.yaml)"),
    "validate": ("fedhlm.cli.lightning", "validate a model with the Lightning CLI"),
    "test": ("fedhlm.cli.lightning", "test a model with the Lightning CLI"),
    "export": ("fedhlm.cli.export", "export the SLM for devices: ONNX (+ int8), head, tokenizer, manifest"),
    "models": ("fedhlm.cli.models", "list the cached models with their test accuracy"),
    "data": ("fedhlm.cli.data", "data utilities: `fedhlm data fetch ag_news`, `fedhlm data info`"),
    "simulate": ("fedhlm.cli.simulate", "run the end-to-end simulation over a Mosquitto broker"),
    "deploy": ("fedhlm.cli.deploy", "start a whole deployment, each role its own process (brokers, bridges, roles)"),
    "client": ("fedhlm.cli.roles", "run one client role (or a site's clients) as its own process"),
    "edge": ("fedhlm.cli.roles", "run one edge server role as its own process"),
    "cloud": ("fedhlm.cli.roles", "run the cloud role as its own process"),
    "llm": ("fedhlm.cli.roles", "run an LLM refiner worker as its own process"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: fedhlm <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    reason = f"signal {signal.Signals(signum).name}"
    request_termination(reason)  # kept even where the raise below is swallowed (inside a __del__)
    raise KeyboardInterrupt(reason)


def terminate_as_interrupt() -> None:
    """SIGTERM (timeout, kill, systemd, CI) takes the Ctrl-C path: brokers stopped and their files removed,
    a partial report written, roles disconnected. Without it the process dies where it stands and leaves
    its mosquitto listening, with the password hashes in its run folder."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    terminate_as_interrupt()
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from fedhlm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fedhlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # role runners and the Lightning CLI need to know which subcommand they serve
    if name in {"fit", "validate", "test", "client", "edge", "cloud", "llm"}:
        rest = [name, *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
