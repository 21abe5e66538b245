"""`fedhlm broker`: a private Mosquitto in the foreground, for trying roles by hand."""

from __future__ import annotations

import argparse
import sys
import time

from fedhlm.transport.broker import LocalBroker


def main(argv: list[str] | None = None) -> int:
    """`fedhlm broker`: a private broker in the foreground; prints its URL and every role's credentials."""
    parser = argparse.ArgumentParser(prog="fedhlm broker", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    parser.add_argument("--clients", type=int, default=4, help="number of client users c00, c01, ...")
    parser.add_argument("--edges", type=int, default=2, help="number of edge users e0, e1, ...")
    parser.add_argument("--run-dir", default=None, help="folder for config, passwords, persistence and log")
    args = parser.parse_args(argv)
    users = {f"c{i:02d}": "client" for i in range(args.clients)}
    users |= {f"e{i}": "edge" for i in range(args.edges)}
    users |= {"cloud": "cloud", "llm": "llm", "admin": "admin"}
    broker = LocalBroker(users, run_dir=args.run_dir, port=args.port)
    with broker:
        print(f"FedHLM broker listening at {broker.url} (run dir {broker.run_dir})")
        print("credentials (URL per role):")
        for user_id in users:
            print(f"  {users[user_id]:6s} {broker.address(user_id).url}")
        print("Ctrl-C to stop.", flush=True)
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    if not broker.running:
        print("broker stopped.", file=sys.stderr)
    return 0
