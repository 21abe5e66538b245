"""The typed messages that travel between FedHLM roles.

Each message is a frozen dataclass that checks itself on construction, so a role holds
either a valid message or a `ValueError` naming the bad field. Vectors are numpy arrays
with a fixed little-endian dtype (the codec ships their raw bytes); field annotations
carry that dtype, and the codec and the AsyncAPI document follow the same annotations.
All integers on the wire are non-negative.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from fedhlm.transport.topics import validate_id

# Field annotations: the metadata names the wire form.
Id = Annotated[str, "id"]  # a role id, safe as a topic level
# token ids: int32 in memory; on the wire uint16 when every id fits (vocabularies up to 65,536,
# i.e. half the bytes for BERT/GPT-2/LLaMA-sized ones), int32 otherwise
TokenIds = Annotated[np.ndarray, "tokens"]
Float32Array = Annotated[np.ndarray, "<f4"]
Float16Array = Annotated[np.ndarray, "<f2"]
Blob = Annotated[bytes, "bytes"]  # raw bytes, MessagePack bin (a packed SimHash sketch)
MAX_BLOB_BYTES = 1024
Params = Annotated[dict, "params<f4"]  # parameter name -> float32 array of any shape

MAX_STR_LENGTH = 256
MAX_INT = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1
PROB_SUM_TOLERANCE = 1e-3
UNIT_NORM_TOLERANCE = 1e-2  # float16 embeddings are unit length only to ~1e-3


@dataclass(frozen=True)
class FieldSpec:
    """How one message field is checked and put on the wire."""

    name: str
    kind: str  # "id" | "str" | "choice" | "int" | "float" | "bool" | "array" | "tokens" | "params"
    dtype: str | None = None  # numpy dtype string (in memory) for "array", "tokens" and "params"
    choices: tuple[str, ...] = ()


def _spec(name: str, hint: Any) -> FieldSpec:
    if typing.get_origin(hint) is Annotated:
        base, meta = typing.get_args(hint)[0], hint.__metadata__[0]
        if base is str and meta == "id":
            return FieldSpec(name, "id")
        if base is bytes and meta == "bytes":
            return FieldSpec(name, "bytes")
        if base is np.ndarray and meta == "tokens":
            return FieldSpec(name, "tokens", dtype="<i4")
        if base is np.ndarray:
            return FieldSpec(name, "array", dtype=meta)
        if base is dict and meta.startswith("params"):
            return FieldSpec(name, "params", dtype=meta[len("params"):])
    if typing.get_origin(hint) is Literal:
        return FieldSpec(name, "choice", choices=tuple(typing.get_args(hint)))
    simple = {str: "str", int: "int", float: "float", bool: "bool"}
    if hint in simple:
        return FieldSpec(name, simple[hint])
    raise TypeError(f"field {name!r}: unsupported annotation {hint!r}")


class Message:
    """Base of all messages: generic field checks from the annotations, then the class's own `_check`."""

    TYPE: ClassVar[str]
    # the wire body: a map of field name -> value (self-describing), or, for a message sent per generated
    # token, an array of the values in field order with token ids as integers and 1-D arrays as raw bin
    POSITIONAL: ClassVar[bool] = False

    @classmethod
    @cache
    def field_specs(cls) -> tuple[FieldSpec, ...]:
        hints = typing.get_type_hints(cls, include_extras=True)
        return tuple(_spec(f.name, hints[f.name]) for f in fields(cls))  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        for spec in self.field_specs():
            where = f"{type(self).__name__}.{spec.name}"
            object.__setattr__(self, spec.name, _coerce(spec, getattr(self, spec.name), where))
        self._check()

    def _check(self) -> None:
        """Class-specific ranges and relations between fields."""

    def _fail(self, field: str, problem: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field}: {problem}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_equal(getattr(self, s.name), getattr(other, s.name)) for s in self.field_specs())

    __hash__ = None  # type: ignore[assignment]  # arrays are mutable in numpy's eyes


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _coerce(spec: FieldSpec, value: Any, where: str) -> Any:
    kind = spec.kind
    if kind == "id":
        return validate_id(value, where)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected str, got {type(value).__name__}")
        if not value or len(value) > MAX_STR_LENGTH or "\0" in value:
            raise ValueError(f"{where}: must be 1-{MAX_STR_LENGTH} characters without NUL")
        return value
    if kind == "choice":
        if value not in spec.choices:
            raise ValueError(f"{where}: must be one of {list(spec.choices)}, got {value!r}")
        return str(value)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{where}: expected bool, got {type(value).__name__}")
        return bool(value)
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{where}: expected int, got {type(value).__name__}")
        if not 0 <= int(value) <= MAX_INT:
            raise ValueError(f"{where}: must be in [0, 2**63 - 1], got {int(value)}")
        return int(value)
    if kind == "float":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where}: expected float, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{where}: must be finite, got {float(value)}")
        return float(value)
    if kind == "bytes":
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
            value = value.tobytes()
        if isinstance(value, str):  # the JSON mirror writes bytes as hex
            try:
                value = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"{where}: expected bytes or their hex, got {value[:16]!r}") from None
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{where}: expected bytes, got {type(value).__name__}")
        if len(value) > MAX_BLOB_BYTES:
            raise ValueError(f"{where}: must be at most {MAX_BLOB_BYTES} bytes, got {len(value)}")
        return bytes(value)
    if kind in ("array", "tokens"):
        array = _array(value, spec.dtype, where)
        if array.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D array, got shape {array.shape}")
        return array
    if kind == "params":
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{where}: expected a non-empty dict of parameter name -> array")
        out = {}
        for name in sorted(value):
            if not isinstance(name, str) or not name or len(name) > MAX_STR_LENGTH:
                raise ValueError(f"{where}: parameter names must be 1-{MAX_STR_LENGTH} character strings, got {name!r}")
            out[name] = _array(value[name], spec.dtype, f"{where}[{name!r}]")
        return out
    raise AssertionError(kind)


def _array(value: Any, dtype: str | None, where: str) -> np.ndarray:
    """A read-only copy of `value` in `dtype`; refuses lossy or non-numeric input."""
    target = np.dtype(dtype)
    try:
        source = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: not an array ({err})") from None
    if source.size and source.dtype.kind not in ("iu" if target.kind in "iu" else "iuf"):
        raise ValueError(f"{where}: expected {target.name} values, got dtype {source.dtype}")
    if target.kind in "iu" and source.size:
        info = np.iinfo(target)
        if source.min() < info.min or source.max() > info.max:
            raise ValueError(f"{where}: values outside the {target.name} range")
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(source, dtype=target, copy=True)
    if target.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{where}: contains non-finite values (or values outside the {target.name} range)")
    array.flags.writeable = False
    return array


def _check_fingerprint(message: Message, field: str, value: int) -> None:
    if value > 2**32 - 1:
        message._fail(field, f"must be a 32-bit fingerprint, got {value}")


def _check_sketch(message: Message) -> None:
    if not message.sketch:  # type: ignore[attr-defined]
        message._fail("sketch", "must not be empty")


def _check_token(message: Message, field: str, token: int) -> None:
    if token > MAX_TOKEN_ID:
        message._fail(field, f"token id {token} exceeds int32")


def _check_unit(message: Message, field: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value <= high:
        message._fail(field, f"must be in [{low}, {high}], got {value}")


@dataclass(frozen=True, eq=False)
class TokenRequest(Message):
    """An uncertain token for the LLM: context, the SLM's draft and its compressed distribution."""

    TYPE: ClassVar[str] = "token_request"

    client_id: Id
    session_id: str
    seq: int
    round: int
    context_ids: TokenIds
    draft_token: int
    topk_ids: TokenIds  # the SLM's k most likely tokens
    topk_probs: Float32Array  # their probabilities
    tail_mass: float  # probability mass outside the top-k
    features: Float32Array  # uncertainty features the threshold head saw
    reason: Literal["uncertain", "exploration", "audit"]

    def _check(self) -> None:
        if self.context_ids.size == 0:
            self._fail("context_ids", "context is empty")
        if (self.context_ids < 0).any():
            self._fail("context_ids", "token ids must be non-negative")
        _check_token(self, "draft_token", self.draft_token)
        _check_topk(self, self.topk_ids, self.topk_probs, self.tail_mass)


@dataclass(frozen=True, eq=False)
class ResolveRequest(TokenRequest):
    """An uncertain token sent through the client's edge: the TokenRequest plus a sketch of its context.

    The edge answers from its cluster's cache (a PeerReply on the client's p2p reply topic) when a
    cached context's estimated cosine reaches the deployment's `p2p.delta`, and forwards the
    TokenRequest to the LLM otherwise. What the sketch adds is all the peer step costs on the wire
    where nothing can hit, so it carries the sketch's family as a 32-bit fingerprint, not its name.
    """

    TYPE: ClassVar[str] = "resolve_request"

    family: int  # core.sketch.SimHash.fingerprint: edges compare only sketches of the same family
    sketch: Blob  # packed SimHash bits of the context representation

    def _check(self) -> None:
        super()._check()
        _check_fingerprint(self, "family", self.family)
        _check_sketch(self)

    def token_request(self) -> TokenRequest:
        """What the LLM receives when the edge has no answer."""
        return TokenRequest(**{f.name: getattr(self, f.name) for f in TokenRequest.field_specs()})


@dataclass(frozen=True, eq=False)
class LLMVerdict(Message):
    """The LLM's answer to one TokenRequest: accepted or resampled, with the numbers behind it."""

    TYPE: ClassVar[str] = "llm_verdict"

    client_id: Id
    session_id: str
    seq: int
    accepted: bool
    final_token: int
    beta: float  # rejection probability of the draft, max(0, 1 - q(x)/p(x)): the threshold heads learn from it
    q_draft: float  # the LLM's probability of the draft token
    llm_ms: float  # LLM compute time
    # the worker that verified (its client id): a generation's later tokens go to that worker's own topic, where
    # its KV cache of the sequence is
    worker: Id

    def _check(self) -> None:
        _check_token(self, "final_token", self.final_token)
        _check_unit(self, "beta", self.beta)
        _check_unit(self, "q_draft", self.q_draft)
        if self.llm_ms < 0:
            self._fail("llm_ms", f"must be >= 0, got {self.llm_ms}")


def _check_topk(message: Message, topk_ids: np.ndarray, topk_probs: np.ndarray, tail_mass: float) -> None:
    """The shared checks of an uploaded top-k: distinct non-negative ids, one probability each, summing to 1."""
    k = topk_ids.size
    if k == 0:
        message._fail("topk_ids", "top-k is empty")
    if (topk_ids < 0).any():
        message._fail("topk_ids", "token ids must be non-negative")
    if np.unique(topk_ids).size != k:
        message._fail("topk_ids", "token ids must be distinct")
    if topk_probs.shape != (k,):
        message._fail("topk_probs", f"expected {k} probabilities to match topk_ids, got {topk_probs.size}")
    if ((topk_probs < 0) | (topk_probs > 1)).any():
        message._fail("topk_probs", "probabilities must be in [0, 1]")
    _check_unit(message, "tail_mass", tail_mass)
    total = float(topk_probs.astype(np.float64).sum()) + tail_mass
    if abs(total - 1.0) > PROB_SUM_TOLERANCE:
        message._fail("tail_mass", f"sum(topk_probs) + tail_mass = {total:.6f}, expected 1 within {PROB_SUM_TOLERANCE}")


@dataclass(frozen=True, eq=False)
class SessionToken(Message):
    """One drafted token of a generation, verified in the LLM's session of this sequence.

    A session holds the KV cache of the confirmed tokens of one sequence: the first request
    (`start` 0) carries the whole prefix, a later one only the tokens from position `start` on
    (those generated since the last verdict, the last verdict's own token first), so the uplink
    of a token does not grow with the sequence. Only what verification needs travels: no
    features, no round; the probabilities as float16. A refiner that does not hold the session
    at `start` answers a SessionMiss and the client sends the prefix again from 0.
    """

    TYPE: ClassVar[str] = "session_token"
    POSITIONAL: ClassVar[bool] = True  # one per offloaded token: field names would be a third of its bytes

    client_id: Id
    session_id: Id  # chosen at random by the client: another client cannot guess it to end the session
    seq: int
    start: int  # position of new_ids[0] in the sequence
    new_ids: TokenIds  # the tokens from `start` to the drafted position
    draft_token: int
    topk_ids: TokenIds
    topk_probs: Float16Array
    tail_mass: float

    def _check(self) -> None:
        if self.new_ids.size == 0:
            self._fail("new_ids", "a session token carries at least one new token")
        if (self.new_ids < 0).any():
            self._fail("new_ids", "token ids must be non-negative")
        _check_token(self, "draft_token", self.draft_token)
        _check_topk(self, self.topk_ids, self.topk_probs, self.tail_mass)


NO_WORKER = "-"  # SessionResolve.worker when no worker holds the session (start 0, or lost): the shared topic


@dataclass(frozen=True, eq=False)
class SessionResolve(SessionToken):
    """An uncertain generation token through the client's edge: the SessionToken plus what its cluster cache
    is keyed by, a SimHash sketch of the prompt and `context_key`, a 32-bit digest of the tokens generated
    so far (a cached answer is reused only at the same generated prefix of a similar prompt).

    The edge answers a hit with a PeerReply; a miss it forwards as the plain SessionToken, to the workers'
    shared session topic at `start` 0 and to the worker named by `worker` (the one holding the session) after
    that, keeping the Response Topic and Correlation Data, and learns the verdict from the client's llm/reply
    topic.
    """

    TYPE: ClassVar[str] = "session_resolve"

    worker: Id  # the LLM worker holding the session, where a later token (start > 0) goes; NO_WORKER at start 0
    family: int  # core.sketch.SimHash.fingerprint, as in ResolveRequest (0 with an empty sketch)
    # packed SimHash bits of the prompt's representation; empty: the one this sequence's earlier request gave
    # the same edge (it goes once per sequence, not with every token)
    sketch: Blob
    context_key: int  # digest of the generated prefix (fedhlm.core.sketch.prefix_key)

    def _check(self) -> None:
        super()._check()
        _check_fingerprint(self, "family", self.family)
        if not 1 <= self.context_key <= 2**32 - 1:  # 0 keys the entries of classification tokens
            self._fail("context_key", f"must be a 32-bit digest >= 1, got {self.context_key}")

    def session_token(self) -> SessionToken:
        """What the LLM worker receives when the edge has no answer."""
        return SessionToken(**{f.name: getattr(self, f.name) for f in SessionToken.field_specs()})


@dataclass(frozen=True, eq=False)
class SessionEnd(Message):
    """The client is done with a sequence: the refiner drops its KV cache now instead of at its TTL."""

    TYPE: ClassVar[str] = "session_end"

    client_id: Id
    session_id: Id


@dataclass(frozen=True, eq=False)
class SessionMiss(Message):
    """The refiner's answer to a SessionToken it cannot continue (session evicted, expired, held by another
    worker, or out of step): it holds `held` tokens of it (0: none); the client resends from position 0."""

    TYPE: ClassVar[str] = "session_miss"

    client_id: Id
    session_id: Id
    seq: int
    held: int


@dataclass(frozen=True, eq=False)
class PeerQuery(Message):
    """A client asks its cluster whether a peer resolved a context this similar already."""

    TYPE: ClassVar[str] = "peer_query"

    client_id: Id
    edge_id: Id
    seq: int
    model_name: str  # embedding model, so peers compare like with like
    embedding: Float16Array  # L2-normalised context embedding
    hops: int
    delta: float  # cosine similarity a hit must reach

    def _check(self) -> None:
        if self.embedding.size == 0:
            self._fail("embedding", "embedding is empty")
        norm = float(np.linalg.norm(self.embedding.astype(np.float64)))
        if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            self._fail("embedding", f"must be L2-normalised, norm is {norm:.4f}")
        _check_unit(self, "delta", self.delta, -1.0, 1.0)


@dataclass(frozen=True, eq=False)
class CacheEntry(Message):
    """An entry one edge added to its cluster cache (a context sketch and the LLM's token), for the other edges."""

    TYPE: ClassVar[str] = "cache_entry"

    edge_id: Id
    family: int
    sketch: Blob
    token: int

    def _check(self) -> None:
        _check_fingerprint(self, "family", self.family)
        _check_sketch(self)
        _check_token(self, "token", self.token)


@dataclass(frozen=True, eq=False)
class PeerReply(Message):
    """A peer's hit for a PeerQuery: the token it resolved for the most similar context."""

    TYPE: ClassVar[str] = "peer_reply"

    responder_id: Id
    seq: int
    token: int
    similarity: float

    def _check(self) -> None:
        _check_token(self, "token", self.token)
        _check_unit(self, "similarity", self.similarity, -1.0, 1.0)


def _check_params(message: Message, params: dict[str, np.ndarray]) -> None:
    for name, array in params.items():
        if array.size == 0:
            message._fail("params", f"parameter {name!r} is empty")


@dataclass(frozen=True, eq=False)
class ThresholdUpdate(Message):
    """A client's locally trained threshold head, sent to its edge (weights only, never data)."""

    TYPE: ClassVar[str] = "threshold_update"

    client_id: Id
    edge_id: Id
    round: int
    num_samples: int  # FedAvg weight
    params: Params

    def _check(self) -> None:
        _check_params(self, self.params)


@dataclass(frozen=True, eq=False)
class ThresholdModel(Message):
    """An aggregated threshold head: an edge's cluster model or the cloud's global model."""

    TYPE: ClassVar[str] = "threshold_model"

    source_id: Id
    level: Literal["edge", "global"]
    round: int
    num_samples: int  # samples behind the aggregate
    params: Params

    def _check(self) -> None:
        _check_params(self, self.params)


@dataclass(frozen=True, eq=False)
class ClientStatus(Message):
    """A client's presence, retained on its status topic (the offline one is its Last Will)."""

    TYPE: ClassVar[str] = "client_status"

    client_id: Id
    online: bool
    edge_id: Id
    ts: float  # Unix time of the change

    def _check(self) -> None:
        if self.ts < 0:
            self._fail("ts", f"must be >= 0, got {self.ts}")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (TokenRequest, ResolveRequest, CacheEntry, LLMVerdict, PeerQuery, PeerReply, ThresholdUpdate, ThresholdModel,
                ClientStatus, SessionToken, SessionResolve, SessionEnd, SessionMiss)
}
