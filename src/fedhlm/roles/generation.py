"""Multi-token generation through the client's router: each token of a sequence is routed by the same
policy and threshold head as a classification token, and an offloaded one is verified in the LLM's
session of that sequence.

Confident tokens stay on the device and send nothing. An uncertain (or exploration) token goes to
the LLM as a `SessionToken`: the first one of a sequence carries the prefix, a later one only the
tokens since the last verdict (that verdict's token first), so the refiner's KV cache grows by what
is new and the uplink of a token does not grow with the sequence. The client continues from the
verdict's token, and the verdict's beta is a (features, beta) label for the federated head, as in
classification. A sequence ends with a `SessionEnd`; a client that dies leaves its session to the
refiner's TTL. With several LLM workers a session lives on the one that opened it: the first token goes to
the workers' shared subscription, its verdict names the worker, and the later tokens (and the end) go to
that worker's own topic; if it does not answer, the sequence reopens on the shared topic from position 0.

The peer step (`p2p.resolver: edge`, a prompt representation given): an uncertain token goes through the
client's edge as a `SessionResolve`, keyed by a sketch of the prompt and the tokens generated so far. A
repeat of a sequence the cluster generated before (the same article on another device, or another
outlet's version of it) is answered by the edge from its cache at the same prefix, without the LLM; a
miss is forwarded to the LLM as the SessionToken it would have been, so it costs one broker hop. A
token taken from the edge is one the LLM's session has not seen: it goes with the next offloaded token,
like a kept one. A share `p2p.audit` of the hits is verified by the LLM too (wrong reuse, measured).
Exploration tokens go through the edge too (their draw is the context's own, so a repeat of an explored
sequence explores the same positions), and under greedy verification a hit is the token's label, as in
classification (`Client.tries_peers`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhlm.core.peer_cache import cache_labels, cached_beta
from fedhlm.core.records import NextToken, SequenceDrafter
from fedhlm.roles.client import Client
from fedhlm.transport import topics
from fedhlm.transport.codec import encode
from fedhlm.transport.messages import LLMVerdict, PeerReply, SessionEnd, SessionMiss, SessionToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedToken:
    """Where one generated token was settled and what it cost."""

    position: int  # in the whole sequence (prompt included)
    token: int
    draft: int
    route: str  # "local" | "peer" (the edge's cache) | "llm"
    reason: str | None = None  # uncertain | exploration | audit (a peer hit verified by the LLM too) | fallback (no
    # verdict: the draft kept) | refused (local: the LLM refused this sequence, so a token the router would have
    # sent stayed on the device)
    accepted: bool | None = None
    uplink_bytes: int = 0  # payload bytes of the session token(s) sent for it
    opened: bool = False  # its request carried the prefix (start 0)
    latency_ms: float = 0.0  # SLM step + routing (+ the LLM round trip)
    llm_ms: float = 0.0  # the refiner's compute for it
    peer_token: int | None = None  # the edge's answer (route peer, or an audit: compared with the LLM's token)


@dataclass
class _Offload:
    """What offloading one token came to."""

    verdict: LLMVerdict | None = None
    hit: PeerReply | None = None  # the edge answered from its cache
    sent: int = 0  # payload bytes
    opened: bool = False  # a request carried the prefix
    misses: int = 0  # SessionMiss answers
    refused: bool = False  # the LLM will not verify this sequence


@dataclass
class Generation:
    """One generated sequence."""

    session_id: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # the new tokens
    steps: list[GeneratedToken] = field(default_factory=list)
    misses: int = 0  # SessionMiss answers (the prefix was sent again)
    worker: str = ""  # the LLM worker holding the session ("" : none yet, or lost: the next offload reopens it)
    sketched: bool = False  # the edge holds this sequence's prompt sketch (later requests leave it out)


class SessionRouter:
    """Generates sequences for one `Client` with its SLM (`SequenceDrafter`), over the client's endpoint."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def generate(self, drafter: SequenceDrafter, prompt_ids: Sequence[int], max_new_tokens: int, round_: int = 0,
                 stop_ids: Collection[int] = (), context: np.ndarray | None = None) -> Generation:
        """Up to `max_new_tokens` new tokens after `prompt_ids` (fewer when a token of `stop_ids` comes).
        `context`: the prompt's representation for the peer step (None: no peer step for this sequence)."""
        c = self.client
        gen = Generation(session_id=secrets.token_hex(4), prompt_ids=[int(t) for t in prompt_ids])
        sequence = list(gen.prompt_ids)
        synced = 0  # tokens of `sequence` the refiner's session holds (0: no session)
        refused = False  # the LLM will not verify this sequence (it answered a miss to a token at start 0)
        sketch = c.peers.sketch(context) if context is not None and c.s.p2p.through_edge else None
        proposal = drafter.open(sequence)
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            reason = c.send_reason(proposal.features, sequence, round_)
            if reason is None or refused:
                if reason is not None:
                    c.counters.fallbacks += 1
                step = GeneratedToken(len(sequence), proposal.draft_token, proposal.draft_token, "local",
                                      "refused" if reason is not None else None,
                                      latency_ms=proposal.ms + (time.perf_counter() - start) * 1000.0)
            else:
                out = self._verify(gen, sequence, synced, proposal, sketch if c.tries_peers(reason) else None)
                peer_token = out.hit.token if out.hit is not None else None
                labels = cache_labels(c.s.routing.verify)  # a cached token is a label: weighed as its reason says
                label_reason = reason
                if out.hit is not None and c.audits(out.hit):  # the LLM checks the edge's answer
                    audit = self._verify(gen, sequence, synced, proposal, None)
                    audit.sent += out.sent
                    if audit.verdict is not None:
                        reason, out = "audit", audit
                        label_reason = label_reason if labels else "audit"
                    else:  # no verdict: the edge's answer stands, and what the refiner holds is unknown: reopen
                        out.sent, out.misses, out.refused = audit.sent, audit.misses, audit.refused
                        synced = 0
                gen.misses += out.misses
                refused = refused or out.refused
                latency = proposal.ms + (time.perf_counter() - start) * 1000.0
                if out.hit is not None:  # the refiner has not seen it: it goes with the next offloaded token
                    if labels:
                        c.learner.add_label(proposal.features, cached_beta(proposal.draft_token, out.hit.token),
                                            reason, round_)
                    step = GeneratedToken(len(sequence), out.hit.token, proposal.draft_token, "peer", reason,
                                          uplink_bytes=out.sent, latency_ms=latency, peer_token=peer_token)
                elif out.verdict is None:
                    c.counters.fallbacks += 1
                    synced = 0  # what the refiner holds is unknown now: the next offload reopens the session
                    step = GeneratedToken(len(sequence), proposal.draft_token, proposal.draft_token, "llm",
                                          "fallback", uplink_bytes=out.sent, opened=out.opened, latency_ms=latency,
                                          peer_token=peer_token)
                else:
                    synced = len(sequence)  # the refiner holds the prefix; its verdict's token comes next time
                    v = out.verdict
                    c.learner.add_label(proposal.features, v.beta, label_reason, round_)
                    step = GeneratedToken(len(sequence), v.final_token, proposal.draft_token, "llm", reason,
                                          v.accepted, out.sent, out.opened, latency, v.llm_ms, peer_token)
            gen.steps.append(step)
            gen.tokens.append(step.token)
            sequence.append(step.token)
            if step.token in stop_ids or len(gen.tokens) == max_new_tokens:
                break  # no SLM step for a position nobody will route
            proposal = drafter.append(step.token)
        if synced or any(s.route == "llm" for s in gen.steps):  # a session may be open: end it now, not at the TTL
            end = topics.llm_worker_session_end(gen.worker) if gen.worker else topics.llm_session_end()
            c.endpoint.publish(end, SessionEnd(c.id, gen.session_id), qos=1)
        return gen

    def _verify(self, gen: Generation, sequence: list[int], synced: int, proposal: NextToken,
                sketch: bytes | None) -> _Offload:
        """Offload one token: through the edge's cache when `sketch` is given (and the edge answers lately),
        else to the LLM. A later token goes to the worker holding the session (`gen.worker`), a first one (or a
        resend from 0) to the shared topic. A timeout is retried `routing.llm_retries` times from 0 on the
        shared topic; a miss at a later position once more, from 0; a miss at 0 means the LLM will not verify
        this sequence."""
        c = self.client
        session_id = gen.session_id
        probs = proposal.topk_probs.astype(np.float16)
        tail = float(min(1.0, max(0.0, 1.0 - float(probs.astype(np.float64).sum()))))
        out, timeouts, start = _Offload(), 0, synced
        generated = sequence[len(gen.prompt_ids):]
        while timeouts <= c.s.routing.llm_retries:
            message: SessionToken = SessionToken(
                client_id=c.id, session_id=session_id, seq=c._next_seq(), start=start,
                new_ids=np.asarray(sequence[start:], dtype=np.int32), draft_token=proposal.draft_token,
                topk_ids=proposal.topk_ids, topk_probs=probs, tail_mass=tail)
            topic = topics.llm_worker_session(gen.worker) if gen.worker and start > 0 else topics.llm_session()
            edge = (c.peers.through(message, gen.worker, b"" if gen.sketched else sketch, generated)
                    if sketch is not None else None)
            if edge is not None:
                topic, message = edge
            out.sent += len(encode(message))
            out.opened = out.opened or start == 0
            asked = time.perf_counter()
            try:
                reply = c.endpoint.request(topic, message, topics.client_llm_reply(c.id),
                                           timeout_s=c.s.routing.llm_timeout_s, qos=1,
                                           also_on=(topics.client_llm_miss(c.id),
                                                    *((c.peers.reply_topic,) if edge is not None else ())),
                                           expiry_s=c.s.routing.llm_timeout_s)
            except TimeoutError as exc:
                timeouts += 1
                log.info("%s: no verdict for session %s seq %d (%d timeouts)", c.id, session_id, message.seq, timeouts)
                if edge is not None:
                    c.peers.edge_failed(exc)  # the edge may be what is gone: the retry goes straight
                    gen.sketched = False
                start, gen.worker = 0, ""  # the worker may be gone, or may or may not have taken the tokens: reopen
                continue
            except ConnectionError:
                break
            gen.sketched = gen.sketched or edge is not None  # it answered: it holds the sketch now
            if edge is not None and c.peers.hit(reply, message.seq, asked):
                out.hit = reply
                return out
            if isinstance(reply, SessionMiss):
                out.misses += 1
                if start == 0:  # refused outright (limits, no sessions, a failed verification): stop asking
                    log.warning("%s: the LLM refused session %s; its remaining tokens stay local", c.id, session_id)
                    out.refused = True
                    return out
                start, gen.worker = 0, ""
                continue
            if isinstance(reply, LLMVerdict) and reply.seq == message.seq:
                gen.worker = reply.worker  # checked as a topic level when decoded
                out.verdict = reply
                return out
        log.warning("%s: the LLM gave no verdict for session %s; keeping the SLM token", c.id, session_id)
        return out
