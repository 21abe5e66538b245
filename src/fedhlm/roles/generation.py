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
The peer step is not used for generation tokens (yet): their contexts differ per sequence.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhlm.core.records import NextToken, SequenceDrafter
from fedhlm.roles.client import Client
from fedhlm.transport import topics
from fedhlm.transport.codec import encode
from fedhlm.transport.messages import LLMVerdict, SessionEnd, SessionMiss, SessionToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedToken:
    """Where one generated token was settled and what it cost."""

    position: int  # in the whole sequence (prompt included)
    token: int
    draft: int
    route: str  # "local" | "llm"
    reason: str | None = None  # uncertain | exploration | fallback (no verdict: the draft kept) | refused (local:
    # the LLM refused this sequence, so a token the router would have sent stayed on the device)
    accepted: bool | None = None
    uplink_bytes: int = 0  # payload bytes of the session token(s) sent for it
    opened: bool = False  # its request carried the prefix (start 0)
    latency_ms: float = 0.0  # SLM step + routing (+ the LLM round trip)
    llm_ms: float = 0.0  # the refiner's compute for it


@dataclass
class Generation:
    """One generated sequence."""

    session_id: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # the new tokens
    steps: list[GeneratedToken] = field(default_factory=list)
    misses: int = 0  # SessionMiss answers (the prefix was sent again)
    worker: str = ""  # the LLM worker holding the session ("" : none yet, or lost: the next offload reopens it)


class SessionRouter:
    """Generates sequences for one `Client` with its SLM (`SequenceDrafter`), over the client's endpoint."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def generate(self, drafter: SequenceDrafter, prompt_ids: Sequence[int], max_new_tokens: int, round_: int = 0,
                 stop_ids: Collection[int] = ()) -> Generation:
        """Up to `max_new_tokens` new tokens after `prompt_ids` (fewer when a token of `stop_ids` comes)."""
        c = self.client
        gen = Generation(session_id=secrets.token_hex(4), prompt_ids=[int(t) for t in prompt_ids])
        sequence = list(gen.prompt_ids)
        synced = 0  # tokens of `sequence` the refiner's session holds (0: no session)
        refused = False  # the LLM will not verify this sequence (it answered a miss to a token at start 0)
        proposal = drafter.open(sequence)
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            reason = self._reason(proposal, round_)
            if reason is None or refused:
                if reason is not None:
                    c.counters.fallbacks += 1
                step = GeneratedToken(len(sequence), proposal.draft_token, proposal.draft_token, "local",
                                      "refused" if reason is not None else None,
                                      latency_ms=proposal.ms + (time.perf_counter() - start) * 1000.0)
            else:
                verdict, sent, opened, misses, refused = self._verify(gen, sequence, synced, proposal)
                gen.misses += misses
                latency = proposal.ms + (time.perf_counter() - start) * 1000.0
                if verdict is None:
                    c.counters.fallbacks += 1
                    synced = 0  # what the refiner holds is unknown now: the next offload reopens the session
                    step = GeneratedToken(len(sequence), proposal.draft_token, proposal.draft_token, "llm",
                                          "fallback", uplink_bytes=sent, opened=opened, latency_ms=latency)
                else:
                    synced = len(sequence)  # the refiner holds the prefix; its verdict's token comes next time
                    c.learner.add_label(proposal.features, verdict.beta, reason, round_)
                    step = GeneratedToken(len(sequence), verdict.final_token, proposal.draft_token, "llm", reason,
                                          verdict.accepted, sent, opened, latency, verdict.llm_ms)
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

    def _reason(self, proposal: NextToken, round_: int) -> str | None:
        """Why this token goes to the LLM (None: it stays local): the client's policy, and its exploration."""
        c = self.client
        if c.offload(proposal.features):
            return "uncertain"
        if c.policy.explores and c.rng.random() < c.s.routing.exploration_rate(round_):
            return "exploration"
        return None

    def _verify(self, gen: Generation, sequence: list[int], synced: int,
                proposal: NextToken) -> tuple[LLMVerdict | None, int, bool, int, bool]:
        """(verdict or None, payload bytes sent, whether the prefix was sent, SessionMiss answers, whether the
        LLM refused the sequence). A later token goes to the worker holding the session (`gen.worker`), a
        first one (or a resend from 0) to the shared topic. A timeout is retried `routing.llm_retries` times
        from 0 on the shared topic; a miss at a later position once more, from 0; a miss at 0 means the LLM
        will not verify this sequence."""
        c = self.client
        session_id = gen.session_id
        probs = proposal.topk_probs.astype(np.float16)
        tail = float(min(1.0, max(0.0, 1.0 - float(probs.astype(np.float64).sum()))))
        sent, opened, misses, timeouts = 0, False, 0, 0
        start = synced
        while timeouts <= c.s.routing.llm_retries:
            message = SessionToken(client_id=c.id, session_id=session_id, seq=c._next_seq(), start=start,
                                   new_ids=np.asarray(sequence[start:], dtype=np.int32),
                                   draft_token=proposal.draft_token, topk_ids=proposal.topk_ids, topk_probs=probs,
                                   tail_mass=tail)
            sent += len(encode(message))
            opened = opened or start == 0
            topic = topics.llm_worker_session(gen.worker) if gen.worker and start > 0 else topics.llm_session()
            try:
                reply = c.endpoint.request(topic, message, topics.client_llm_reply(c.id),
                                           timeout_s=c.s.routing.llm_timeout_s, qos=1,
                                           also_on=(topics.client_llm_miss(c.id),),
                                           expiry_s=c.s.routing.llm_timeout_s)
            except TimeoutError:
                timeouts += 1
                log.info("%s: no verdict for session %s seq %d (%d timeouts)", c.id, session_id, message.seq, timeouts)
                start, gen.worker = 0, ""  # the worker may be gone, or may or may not have taken the tokens: reopen
                continue
            except ConnectionError:
                break
            if isinstance(reply, SessionMiss):
                misses += 1
                if start == 0:  # refused outright (limits, no sessions, a failed verification): stop asking
                    log.warning("%s: the LLM refused session %s; its remaining tokens stay local", c.id, session_id)
                    return None, sent, opened, misses, True
                start, gen.worker = 0, ""
                continue
            if isinstance(reply, LLMVerdict) and reply.seq == message.seq:
                gen.worker = reply.worker  # checked as a topic level when decoded
                return reply, sent, opened, misses, False
        log.warning("%s: the LLM gave no verdict for session %s; keeping the SLM token", c.id, session_id)
        return None, sent, opened, misses, False

