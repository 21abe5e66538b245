"""`fedhlm broker`: a private Mosquitto in the foreground, for trying roles by hand.

With `--run-dir` the broker's folder is the operator's: the generated passwords are kept in
`<run-dir>/credentials.json` (mode 0600) and reused on the next start, so roles that are still
running keep their access across a broker restart. Without it the folder is temporary and removed
on exit (Ctrl-C or SIGTERM alike).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from fedhlm.transport.broker import LocalBroker

CREDENTIALS_FILE = "credentials.json"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def kept_passwords(run_dir: Path | None) -> dict[str, str]:
    """The passwords an earlier start wrote into the run folder (none without a folder or a file)."""
    if run_dir is None or not (run_dir / CREDENTIALS_FILE).is_file():
        return {}
    data = json.loads((run_dir / CREDENTIALS_FILE).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{run_dir / CREDENTIALS_FILE}: expected a mapping of user to password")
    return data


def keep_passwords(run_dir: Path, broker: LocalBroker) -> Path:
    path = run_dir / CREDENTIALS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({u: broker.address(u).password for u in broker.users}, out, indent=1)
    path.chmod(0o600)
    return path


def main(argv: list[str] | None = None) -> int:
    """`fedhlm broker`: a private broker in the foreground; prints its URL and every role's credentials."""
    parser = argparse.ArgumentParser(prog="fedhlm broker", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    parser.add_argument("--clients", type=int, default=4, help="number of client users c000, c001, ...")
    parser.add_argument("--edges", type=int, default=2, help="number of edge users e0, e1, ...")
    parser.add_argument("--run-dir", default=None, help="folder for config, passwords (kept across restarts), "
                                                        "persistence and log")
    args = parser.parse_args(argv)
    if args.clients < 0 or args.edges < 0:
        parser.error("--clients and --edges must be >= 0")
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.port is not None and port_in_use("127.0.0.1", args.port):
        print(f"fedhlm broker: port {args.port} on 127.0.0.1 is already in use", file=sys.stderr)
        return 1
    users = {f"c{i:03d}": "client" for i in range(args.clients)}
    users |= {f"e{i}": "edge" for i in range(args.edges)}
    users |= {"cloud": "cloud", "llm": "llm", "admin": "admin"}
    run_dir = Path(args.run_dir) if args.run_dir else None
    try:
        broker = LocalBroker(users, run_dir=run_dir, port=args.port, passwords=kept_passwords(run_dir))
        broker.start()
    except (OSError, RuntimeError, ValueError) as err:
        print(f"fedhlm broker: {err}", file=sys.stderr)
        return 1
    interrupted = False
    try:
        kept = keep_passwords(run_dir, broker) if run_dir is not None else None
        print(f"FedHLM broker listening at {broker.url} (run dir {broker.run_dir})")
        if kept is not None:
            print(f"credentials kept in {kept} (mode 0600; reused on the next start with this --run-dir)")
        print("credentials (URL per role):")
        for user_id in users:
            print(f"  {users[user_id]:6s} {broker.address(user_id).url}")
        print("Ctrl-C to stop.", flush=True)
        while broker.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        died = not broker.running and not interrupted
        tail = broker.log_file.read_text()[-1500:].strip() if died and broker.log_file.is_file() else ""
        broker.__exit__(None, None, None)
    if died:
        print(f"fedhlm broker: mosquitto exited unexpectedly; its log ended with:\n{tail}", file=sys.stderr)
        return 1
    print("broker stopped.", file=sys.stderr)
    return 0
