"""The LLM as a remote inference server: an OpenAI-compatible `/v1/completions` with log-probabilities.

The refiner's verification needs q, the LLM's distribution over the routed token, for the
token the client drafted even when the server would not list it. For a classification token
the candidates are the task's classes, so q is the server's distribution restricted to the
classes' continuations (conditioned on answering a class):

1. one completion call (`max_tokens: 1`, `logprobs: N`, `min_tokens: 1` so that an end-of-text
   argmax still lists the alternatives) gives the next token's top-N log-probabilities; a class
   whose continuation's first token is among them is scored;
2. a class outside the top-N (`models.remote.outside_top`) is scored by echoing prompt +
   continuation (the prompt's own log-probabilities; vLLM), by asking again for `widen_to`
   alternatives (llama.cpp's llama-server and llama-cpp-python's server list as many as asked),
   or bounded from above by the N-th log-probability (counted as `bounded`). `auto` echoes only
   where a start-up probe finds the echoed scores consistent with the listed ones: llama-cpp-python
   0.3.36 pairs each echoed token with the next position's scores when the model has no BOS token
   (SmolLM2), which the probe catches.

The request's token ids (the SLM's vocabulary) are decoded back to text first: the server has
its own tokenizer. q comes back on the SLM's vocabulary, its mass on the classes' verbaliser ids,
so :func:`fedhlm.maths.verification.verify_drafts` and the LLM service use it unchanged.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch

from fedhlm.core.records import ModelLimits
from fedhlm.core.settings import RemoteLLMSettings
from fedhlm.data import load_task, load_tokenizer
from fedhlm.data.encoding import verbaliser_token_ids
from fedhlm.data.task import Task

log = logging.getLogger(__name__)


class RemoteLLMError(ConnectionError):
    """The LLM server cannot be reached, refuses a call, or answers something that is not a scored completion
    (a ConnectionError, so that the CLI ends it with one line, as it does a broker that refuses)."""


# ---- pure functions: what a completion's log-probabilities say about the classes -----------------

def default_continuations(task: Task) -> list[str]:
    """What the server is asked to continue the prompt with, per class: its verbaliser as a capitalised word."""
    return [" " + v[:1].upper() + v[1:] for v in task.verbalisers]


def top_logprob_map(choice: Mapping[str, Any], position: int = 0) -> dict[str, float]:
    """token text -> log-probability of the top-N at one completion position, in either shape servers send:
    the legacy `{text: logprob}` mapping (llama-cpp-python, vLLM) or `[{token, logprob}]` (llama-server)."""
    logprobs = choice.get("logprobs") or {}
    rows = logprobs.get("top_logprobs") if isinstance(logprobs, Mapping) else None
    if rows is None and isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
        rows = [entry.get("top_logprobs") for entry in logprobs["content"]]  # chat-style content list
    if not rows or len(rows) <= position or rows[position] is None:
        raise RemoteLLMError(f"the completion has no top log-probabilities at position {position}: {logprobs!r:.200}")
    row = rows[position]
    if isinstance(row, Mapping):
        return {str(k): float(v) for k, v in row.items()}
    return {str(e["token"]): float(e["logprob"]) for e in row}


def continuation_logprob(choice: Mapping[str, Any], start: int, end: int) -> float:
    """Sum of the echoed log-probabilities of the tokens that begin in characters [start, end) of the text:
    the continuation's log-probability after the prompt (`start` = the prompt's length)."""
    lp = choice.get("logprobs") or {}
    offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
    if not offsets or values is None or len(offsets) != len(values):
        raise RemoteLLMError("the echoed completion has no token offsets and log-probabilities (does the server echo "
                             "with logprobs? set models.remote.echo: false if it cannot)")
    picked = [v for o, v in zip(offsets, values) if start <= o < end]
    if not picked or any(v is None for v in picked):
        raise RemoteLLMError(f"no echoed token starts inside the continuation at characters {start}..{end}")
    return float(sum(picked))


def class_logprobs(top: Mapping[str, float], first_tokens: Sequence[str]) -> list[float | None]:
    """Each class's first-token log-probability from the top-N map; None where it is not listed."""
    return [top.get(t) for t in first_tokens]


def restricted_q(scores: Sequence[float]) -> list[float]:
    """The distribution over the classes: softmax of their log-probabilities (the server's distribution
    conditioned on answering one of them)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


# ---- the HTTP client ------------------------------------------------------------------------------

class CompletionsClient:
    """POSTs to `<url>/completions` on one keep-alive connection per thread (stdlib only)."""

    def __init__(self, url: str, model: str, timeout_s: float, api_key: str | None = None) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteLLMError(f"models.remote.url: not an http(s) URL: {url!r}")
        self.url, self.model, self.timeout_s = url.rstrip("/"), model, timeout_s
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.timeout_s)
        return conn

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON call; a dropped keep-alive connection is reopened once."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._path + path, body=data, headers=self._headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 0 and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                     BrokenPipeError)):
                    continue
                raise RemoteLLMError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
            if resp.status != 200:
                raise RemoteLLMError(f"{self.url}{path}: HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise RemoteLLMError(f"{self.url}{path}: not JSON: {raw[:200]!r}") from exc
        raise AssertionError("unreachable")

    def complete(self, prompt: str, *, logprobs: int, echo: bool = False) -> dict[str, Any]:
        """The first choice of a one-token greedy completion with `logprobs` alternatives per position."""
        # min_tokens: a prompt whose likeliest next token ends the text must still list the alternatives
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": 1, "min_tokens": 1, "temperature": 0.0,
                                "logprobs": logprobs}
        if echo:
            body["echo"] = True
        if self.model:
            body["model"] = self.model
        out = self.call("POST", "/completions", body)
        choices = out.get("choices")
        if not isinstance(choices, list) or not choices:
            raise RemoteLLMError(f"{self.url}/completions: no choices in {str(out)[:200]}")
        return choices[0]


# ---- the QFunction --------------------------------------------------------------------------------

@dataclass
class RemoteStats:
    """What the backend did: calls made, classes scored by echo or bounded, time on the wire."""

    rows: int = 0
    calls: int = 0
    echo_calls: int = 0
    bounded: int = 0
    http_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, calls: int, echo_calls: int, bounded: int, seconds: float) -> None:
        with self._lock:
            self.rows += 1
            self.calls += calls
            self.echo_calls += echo_calls
            self.bounded += bounded
            self.http_s += seconds

    def as_dict(self) -> dict[str, float]:
        return {"rows": self.rows, "calls": self.calls, "echo_calls": self.echo_calls, "bounded": self.bounded,
                "http_s": round(self.http_s, 3)}


class RemoteLLM:
    """The refiner's LLM on a remote completions server; a :data:`~fedhlm.maths.verification.QFunction`.

    `tokenizer` is the vocabulary the requests are in (the SLM's), `task` gives the classes.
    Construct with :meth:`connect`, which checks the server, learns each continuation's first token
    and decides how a class outside the top-N is scored (`models.remote.outside_top`).
    """

    ECHO_TOLERANCE = 1e-2  # nats: echoed and listed scores of the same tokens must agree this well

    def __init__(self, settings: RemoteLLMSettings, tokenizer: Any, task: Task, client: CompletionsClient) -> None:
        self.settings, self.tokenizer, self.task, self.client = settings, tokenizer, task, client
        self.continuations = list(settings.continuations) or default_continuations(task)
        if len(self.continuations) != task.num_classes:
            raise RemoteLLMError(f"models.remote.continuations: {len(self.continuations)} given for the "
                                 f"{task.num_classes} classes of task {task.name}")
        self.class_ids = verbaliser_token_ids(tokenizer, task)
        self.suffix_len = len(tokenizer(task.prompt_suffix, add_special_tokens=False)["input_ids"])
        self.first_tokens = list(self.continuations)  # refined by connect() where the server echoes
        self.multi_token = [False] * len(self.continuations)  # a continuation the server splits: echo scores it
        self.outside = "bound" if settings.outside_top == "auto" else settings.outside_top  # connect() decides auto
        self.prior = [0.0] * len(self.continuations)  # the content-free article's scores (connect() measures them)
        self.stats = RemoteStats()
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="remote-llm")
        self.config = {"model": {"backend": "openai", "url": client.url, "model": client.model, "task": task.name,
                                 "outside_top": self.outside}, "data": {}}
        self.folder = None

    @classmethod
    def connect(cls, settings: RemoteLLMSettings, *, tokenizer: Any | None = None,
                task: Task | str | None = None) -> "RemoteLLM":
        """Check that the server answers a scored completion, before any work; learn how to score the classes."""
        if not settings.url:
            raise RemoteLLMError("models.remote.url: the openai backend needs the server's URL (e.g. "
                                 "http://127.0.0.1:8080/v1)")
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not key:
            raise RemoteLLMError(f"models.remote.api_key_env: environment variable {settings.api_key_env} is not set")
        client = CompletionsClient(settings.url, settings.model, settings.timeout_s, key)
        llm = cls(settings, tokenizer or load_tokenizer(), task if isinstance(task, Task) else load_task(task or "ag_news"),
                  client)
        llm._probe()
        if settings.content_free is not None:
            llm.prior = llm.raw_scores(settings.content_free)
            llm.config["model"]["content_free_prior"] = [round(p, 4) for p in llm.prior]
        return llm

    def _probe(self) -> None:
        """Where the server echoes: its own split of each continuation (the first token is what the top-N
        lists), and whether its echoed log-probabilities agree with the listed ones (llama-cpp-python 0.3 pairs
        them with the wrong position for a model without a BOS token). Without echo, each continuation is
        taken as one token of the server's vocabulary."""
        prompt = self.prompt_for("a test article")
        top = top_logprob_map(self.client.complete(prompt, logprobs=self.settings.widen_to if self.outside == "widen"
                                                   else self.settings.top_logprobs))
        if self.settings.outside_top in ("widen", "bound"):
            return
        firsts, multi, echoed = [], [], []
        for cont in self.continuations:
            full = prompt + cont
            try:
                choice = self.client.complete(full, logprobs=0, echo=True)
                lp = choice.get("logprobs") or {}
                inside = [t for t, o in zip(lp.get("tokens") or [], lp.get("text_offset") or [])
                          if len(prompt) <= o < len(full)]
                if not inside:  # llama-server refuses echo, or ignores it and lists only the new token
                    raise RemoteLLMError(f"{self.client.url}: echo did not return the prompt's tokens")
            except RemoteLLMError as exc:
                if self.settings.outside_top == "echo":
                    raise RemoteLLMError(f"{exc} (models.remote.outside_top echo: this server cannot echo; use "
                                         "widen or bound)") from exc
                log.info("remote LLM: the server does not echo (%s); classes outside the top-%d are widened",
                         exc, self.settings.top_logprobs)
                self.outside = self.config["model"]["outside_top"] = "widen"
                return
            firsts.append(inside[0])
            multi.append(len(inside) > 1)
            echoed.append(continuation_logprob(choice, len(prompt), len(prompt) + len(inside[0])))
        if len(set(firsts)) != len(firsts):
            raise RemoteLLMError(f"models.remote.continuations: {self.continuations} start with the same server "
                                 f"token ({firsts}); give continuations that differ in their first token")
        self.first_tokens, self.multi_token = firsts, multi
        listed = [(e, top[f]) for e, f in zip(echoed, firsts) if f in top]
        # differences, not values: a server may renormalise the listed ones (min_tokens bans the end token)
        consistent = len(listed) >= 2 and all(abs((e - listed[0][0]) - (t - listed[0][1])) <= self.ECHO_TOLERANCE
                                              for e, t in listed)
        if self.settings.outside_top == "echo" and not consistent:
            raise RemoteLLMError(f"{self.client.url}: echoed log-probabilities {echoed} disagree with the listed "
                                 f"ones {[top.get(f) for f in firsts]}; use models.remote.outside_top widen")
        self.outside = "echo" if consistent else "widen"
        if not consistent:
            log.warning("remote LLM %s: echoed log-probabilities disagree with the listed ones (%s vs %s); classes "
                        "outside the top-%d are scored by widening to %d", self.client.url, echoed,
                        [top.get(f) for f in firsts], self.settings.top_logprobs, self.settings.widen_to)
        self.config["model"]["outside_top"] = self.outside

    def prompt_for(self, text: str) -> str:
        return self.settings.prompt.format(text=text.strip(), choices=", ".join(c.strip() for c in self.continuations))

    def text_of(self, ids: Sequence[int]) -> str:
        """The article a request's context holds: its ids without the task's prompt suffix, decoded."""
        body = list(ids)[: max(len(ids) - self.suffix_len, 0)]
        return self.tokenizer.decode(body, skip_special_tokens=True)

    def class_scores(self, text: str) -> list[float]:
        """Each class's score for `text`: its log-probability as the prompt's continuation, calibrated against
        the content-free article's (`models.remote.content_free`)."""
        return [s - p for s, p in zip(self.raw_scores(text), self.prior)]

    def raw_scores(self, text: str) -> list[float]:
        """Each class's log-probability as the continuation of the prompt for `text`."""
        start = time.perf_counter()
        prompt = self.prompt_for(text)
        top = top_logprob_map(self.client.complete(prompt, logprobs=self.settings.top_logprobs))
        scores = class_logprobs(top, self.first_tokens)
        calls, echo_calls, bounded = 1, 0, 0
        if self.outside == "widen" and None in scores:
            top = top_logprob_map(self.client.complete(prompt, logprobs=self.settings.widen_to))
            scores = [top.get(t) if s is None else s for s, t in zip(scores, self.first_tokens)]
            calls += 1
        for c, score in enumerate(scores):
            if self.outside == "echo" and (score is None or self.multi_token[c]):
                full = prompt + self.continuations[c]
                scores[c] = continuation_logprob(self.client.complete(full, logprobs=0, echo=True), len(prompt),
                                                 len(full))
                echo_calls += 1
            elif score is None:
                scores[c] = min(top.values())  # an upper bound: it is not among the listed
                bounded += 1
        self.stats.add(calls + echo_calls, echo_calls, bounded, time.perf_counter() - start)
        return [float(s) for s in scores]  # type: ignore[arg-type]

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """q [B, V] on the request vocabulary: the restricted class distribution on the verbaliser ids."""
        texts = [self.text_of(input_ids[i, : int(last[i]) + 1].tolist()) for i in range(input_ids.shape[0])]
        scores = list(self._pool.map(self.class_scores, texts))
        q = torch.zeros(input_ids.shape[0], len(self.tokenizer))
        ids = torch.tensor(self.class_ids, dtype=torch.long)
        for i, row in enumerate(scores):
            q[i, ids] = torch.tensor(restricted_q(row))
        return q

    q_fn = __call__

    def limits(self) -> ModelLimits:
        """Requests are in the SLM's vocabulary; the server's context is the operator's to size."""
        return ModelLimits(vocab_size=len(self.tokenizer), max_positions=int(min(self.tokenizer.model_max_length, 4096)))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
