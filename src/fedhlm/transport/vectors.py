"""Golden payload vectors: fixed messages, their exact wire bytes and their JSON view.

A device implementation (C, MicroPython, ...) proves it speaks FedHLM by encoding each
`<name>.json` to exactly `<name>.msgpack` and decoding the bytes back. The messages are
built from exact binary fractions and integer arithmetic so that they are the same on
every platform and numpy version.

    python -m fedhlm.transport.vectors            # compare transport/vectors/ with this file
    python -m fedhlm.transport.vectors --write    # regenerate them after a deliberate change
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedhlm.transport.codec import encode, to_json
from fedhlm.transport.messages import (
    CacheEntry,
    ClientStatus,
    LLMVerdict,
    Message,
    PeerQuery,
    PeerReply,
    ResolveRequest,
    SessionEnd,
    SessionMiss,
    SessionResolve,
    SessionToken,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "transport" / "vectors"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _unit_vector(dim: int) -> np.ndarray:
    """A deterministic L2-normalised vector (integer pattern, then IEEE-exact sqrt and division)."""
    raw = np.array([((i * 37) % 23) - 11 for i in range(dim)], dtype=np.float64)
    return (raw / np.sqrt((raw * raw).sum())).astype(np.float16)


def golden_messages() -> dict[str, Message]:
    """Name -> message for every vector file; one to three per message type."""
    return {
        "token_request_uncertain": TokenRequest(
            client_id="c0", session_id="s-0001", seq=7, round=3,
            context_ids=[101, 2054, 2003, 1996, 3007, 1997, 2605, 1029, 102], draft_token=3000,
            topk_ids=[3000, 3001, 4000, 5000], topk_probs=[0.5, 0.25, 0.125, 0.0625], tail_mass=0.0625,
            features=[1.25, 0.25, 0.5], reason="uncertain",
        ),
        "token_request_exploration": TokenRequest(
            client_id="c3", session_id="s-0002", seq=0, round=0,
            context_ids=[101], draft_token=7, topk_ids=[7], topk_probs=[0.9375], tail_mass=0.0625,
            features=[], reason="exploration",
        ),
        "session_token_open": SessionToken(
            client_id="c0", session_id="9f3a1c2e", seq=11, start=0,
            new_ids=[101, 2054, 2003, 1996, 3007, 102, 2047], draft_token=3000,
            topk_ids=[3000, 3001, 4000, 5000], topk_probs=[0.5, 0.25, 0.125, 0.0625], tail_mass=0.0625,
        ),
        "session_token_continue": SessionToken(
            client_id="c0", session_id="9f3a1c2e", seq=12, start=8, new_ids=[3001, 2000],
            draft_token=2001, topk_ids=[2001, 2002], topk_probs=[0.75, 0.125], tail_mass=0.125,
        ),
        "session_resolve_simhash": SessionResolve(
            client_id="c0", session_id="9f3a1c2e", seq=13, start=10, new_ids=[2001, 2003],
            draft_token=2004, topk_ids=[2004, 2005], topk_probs=[0.5, 0.25], tail_mass=0.25,
            worker="llm1", family=4217640349, sketch=bytes([0, 1, 2, 4, 8, 16, 128, 255]),
            context_key=2863311530,
        ),
        "session_resolve_later": SessionResolve(  # the edge holds the sequence's sketch: it goes once
            client_id="c0", session_id="9f3a1c2e", seq=14, start=12, new_ids=[2004], draft_token=2006,
            topk_ids=[2006], topk_probs=[0.75], tail_mass=0.25, worker="llm1", family=0, sketch=b"",
            context_key=1431655765,
        ),
        "session_end": SessionEnd(client_id="c0", session_id="9f3a1c2e"),
        "session_miss": SessionMiss(client_id="c0", session_id="9f3a1c2e", seq=12, held=0),
        "resolve_request_simhash": ResolveRequest(
            client_id="c0", session_id="s-0003", seq=9, round=3,
            context_ids=[101, 2054, 2003, 102], draft_token=3000, topk_ids=[3000, 3001],
            topk_probs=[0.5, 0.375], tail_mass=0.125, features=[1.25], reason="uncertain",
            family=4217640349, sketch=bytes([0, 1, 2, 4, 8, 16, 128, 255]),
        ),
        "cache_entry_simhash": CacheEntry(edge_id="e1", family=4217640349, sketch=bytes([255, 128, 16, 8, 4, 2, 1, 0]),
                                          token=3001),
        "llm_verdict_accepted": LLMVerdict(
            client_id="c0", session_id="s-0001", seq=7, accepted=True, final_token=3000,
            beta=1.0, q_draft=0.625, llm_ms=12.5, worker="llm",
        ),
        "llm_verdict_resampled": LLMVerdict(
            client_id="c0", session_id="s-0001", seq=8, accepted=False, final_token=3001,
            beta=0.25, q_draft=0.125, llm_ms=13.75, worker="llm1",
        ),
        "peer_query_small": PeerQuery(
            client_id="c1", edge_id="e0", seq=42, model_name=MINILM,
            embedding=[0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0], hops=1, delta=0.875,
        ),
        "peer_query_minilm384": PeerQuery(
            client_id="c2", edge_id="e1", seq=43, model_name=MINILM,
            embedding=_unit_vector(384), hops=0, delta=0.9,
        ),
        "peer_reply_hit": PeerReply(responder_id="c2", seq=42, token=3000, similarity=0.9375),
        "threshold_update_tau": ThresholdUpdate(
            client_id="c0", edge_id="e0", round=3, num_samples=250, params={"tau": np.float32(0.25)},
        ),
        "threshold_update_head": ThresholdUpdate(
            client_id="c1", edge_id="e0", round=3, num_samples=120,
            params={"weight": [[0.5, -0.25, 0.0625]], "bias": [0.125], "temperature": [1.0]},
        ),
        "threshold_model_edge": ThresholdModel(
            source_id="e0", level="edge", round=3, num_samples=370, params={"tau": np.float32(0.3125)},
        ),
        "threshold_model_global": ThresholdModel(
            source_id="cloud", level="global", round=4, num_samples=1480, params={"tau": np.float32(0.375)},
        ),
        "client_status_online": ClientStatus(client_id="c0", online=True, edge_id="e0", ts=1767225600.0),
        "client_status_offline": ClientStatus(client_id="c0", online=False, edge_id="e0", ts=1767225660.5),
    }


def render_json(message: Message) -> str:
    """The JSON file text of one vector: one body field a line, arrays inline, trailing newline."""
    envelope = to_json(message)
    fields = [f"    {json.dumps(name)}: {json.dumps(value)}" for name, value in envelope["b"].items()]
    return (
        "{\n"
        f'  "v": {json.dumps(envelope["v"])},\n'
        f'  "t": {json.dumps(envelope["t"])},\n'
        '  "b": {\n' + ",\n".join(fields) + "\n  }\n}\n"
    )


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    """(Re)generate every vector file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, message in golden_messages().items():
        (directory / f"{name}.msgpack").write_bytes(encode(message))
        (directory / f"{name}.json").write_text(render_json(message))
        written += [directory / f"{name}.msgpack", directory / f"{name}.json"]
    return written


def compare(directory: Path = DEFAULT_DIR) -> list[str]:
    """Differences between the vector files and `golden_messages()`; empty when they agree."""
    problems = []
    names = golden_messages()
    for name, message in names.items():
        binary, text = directory / f"{name}.msgpack", directory / f"{name}.json"
        if not binary.is_file() or binary.read_bytes() != encode(message):
            problems.append(f"{binary}: missing or different from the generator")
        if not text.is_file() or text.read_text() != render_json(message):
            problems.append(f"{text}: missing or different from the generator")
    stale = {p.stem for p in directory.glob("*.msgpack")} | {p.stem for p in directory.glob("*.json")}
    problems += [f"{directory / name}.*: not produced by the generator" for name in sorted(stale - names.keys())]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhlm.transport.vectors", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="vector folder (default: transport/vectors)")
    parser.add_argument("--write", action="store_true", help="regenerate the files instead of comparing")
    args = parser.parse_args(argv)
    if args.write:
        print(f"wrote {len(write(args.dir))} files to {args.dir}")
        return 0
    problems = compare(args.dir)
    for problem in problems:
        print(problem)
    print("vectors up to date" if not problems else f"{len(problems)} problem(s); run with --write if the change is deliberate")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
