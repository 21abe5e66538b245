"""The SLM and LLM modules, their HF models, the model cache: tiny random models, real maths."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhlm.data import NewsItem, encode_prompts, load_tokenizer, verbaliser_token_ids
from fedhlm.models.backbone import (
    BackboneSpec,
    build_bert_decoder,
    load_causal_lm,
    project_embeddings,
    save_model,
)
from fedhlm.models.kv_cache import SessionMismatch
from fedhlm.models.llm import LLMRefiner
from fedhlm.models.cache import get_or_train, save_to_cache
from fedhlm.models.head_fit import FIT_ENGINES, OPTIMIZERS, CentralHeadModule, HeadModule, TorchHead, fit_head
from fedhlm.models.store import HEAD_FILE, ModelFolderError, cached_models, latest
from fedhlm.cli.models import main as models_main
from fedhlm.models.slm import SLMModule
from fedhlm.maths.speculative import rejection_probability
from fedhlm.maths.threshold import ThresholdHead, annealed_temperature, central_threshold
from fedhlm.maths.uncertainty import FEATURE_NAMES
from fedhlm.maths.verification import Draft, verify_drafts

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}
REPO = Path(__file__).resolve().parents[1]


def ag_news_path() -> Path | None:
    env = os.environ.get("FEDHLM_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO / ".." / "shared" / "data" / "ag_news" / "ag_news_dev.csv"]:
        if candidate.is_file():
            return candidate
        if candidate.is_dir() and (candidate / "ag_news_dev.csv").is_file():
            return candidate / "ag_news_dev.csv"
    return None


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_llm_folder(tmp_path_factory, tokenizer) -> Path:
    model = build_bert_decoder(BackboneSpec(**TINY, seed=1), vocab_size=len(tokenizer))
    return save_model(model, tmp_path_factory.mktemp("tiny_llm"), tokenizer)


@pytest.fixture(scope="module")
def tiny_slm_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_slm")
    SLMModule(**TINY, seed=2).save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_slm() -> SLMModule:
    return SLMModule(**TINY, topk=4)


@pytest.fixture
def tiny_llm(tiny_llm_folder) -> LLMRefiner:
    return LLMRefiner(pretrained=str(tiny_llm_folder), max_sessions=2)


def prompts(tokenizer, n: int = 6) -> dict[str, torch.Tensor]:
    words = ["stocks fell as markets", "the team won the final", "the new chip speeds up", "leaders met at the summit"]
    items = [NewsItem(i, i % 4, f"headline {i}", words[i % 4] + " today" * (i % 3)) for i in range(n)]
    return encode_prompts(tokenizer, items)


# ---- loading and errors -----------------------------------------------------------------
def test_missing_model_folder_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelFolderError, match=str(missing)):
        load_causal_lm(missing)
    with pytest.raises(ModelFolderError, match=str(missing)):
        SLMModule(pretrained=str(missing))


def test_corrupt_config_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match=str(tmp_path / "config.json")):
        load_causal_lm(tmp_path)


def test_corrupt_weights_error_names_the_folder(tmp_path, tiny_llm_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_llm_folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((tiny_llm_folder / "model.safetensors").read_bytes()[:300])
    with pytest.raises(ModelFolderError, match=f"cannot load a causal LM from {bad}"):
        load_causal_lm(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=f"{bad} has no weights"):
        load_causal_lm(bad)


def test_minilm_loads_as_causal_decoder_with_tied_embeddings():
    llm = load_causal_lm("minilm")
    assert llm.config.is_decoder and llm.config.hidden_size == 384
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()
    # causal: changing a later token leaves earlier positions' logits unchanged
    ids = torch.tensor([[101, 2088, 2998, 2449, 2671, 8476, 1024]])
    other = ids.clone()
    other[0, 5] = 2003
    with torch.no_grad():
        a, b = llm(input_ids=ids).logits, llm(input_ids=other).logits
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5) and not torch.allclose(a[0, 5:], b[0, 5:])


def test_pca_projection_keeps_the_centred_geometry():
    x = torch.randn(200, 16) @ torch.randn(16, 16)
    full, basis = project_embeddings(x, 16)
    c = full - full.mean(0)
    xc = x - x.mean(0)
    assert torch.allclose(c @ c.T, xc @ xc.T, atol=1e-3)  # a rotation when dim == D
    low, _ = project_embeddings(x, 4)
    var = (low - low.mean(0)).var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-5)  # components by decreasing variance


def test_slm_embeddings_start_from_a_projection_of_the_larger_model(tokenizer, tiny_llm_folder):
    spec = BackboneSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, embeddings_from=str(tiny_llm_folder))
    slm = build_bert_decoder(spec, vocab_size=len(tokenizer))
    src = load_causal_lm(tiny_llm_folder).get_input_embeddings().weight.detach()
    expected, _ = project_embeddings(src, 16)
    assert torch.allclose(slm.get_input_embeddings().weight, expected, atol=1e-5)
    assert slm.get_output_embeddings().weight.data_ptr() == slm.get_input_embeddings().weight.data_ptr()


def test_any_hf_causal_lm_sharing_the_tokenizer_works_as_slm_and_llm(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128))
    folder = save_model(gpt2, tmp_path / "gpt2")
    slm = SLMModule(pretrained=str(folder), topk=4)
    llm = LLMRefiner(pretrained=str(folder))
    batch = prompts(tokenizer)
    out = slm.route_batch(batch)
    assert out["features"].shape == (6, len(FEATURE_NAMES))
    ids = batch["input_ids"][0, : batch["last_index"][0] + 1]
    q_cached = llm.session_q("g", ids[:4], 0)
    q_cached = llm.session_q("g", ids[4:], 4)
    assert torch.allclose(q_cached, llm.reencoded_q(ids), atol=1e-5)


# ---- SLM module ---------------------------------------------------------------------------
def test_predict_step_returns_routing_view_per_input(tiny_slm, tokenizer):
    batch = prompts(tokenizer)
    out = tiny_slm.route_batch(batch)
    assert out["draft_token"].shape == (6,) and out["topk_ids"].shape == (6, 4)
    assert torch.allclose(out["class_probs"].sum(-1), torch.ones(6))
    verbalisers = torch.tensor(verbaliser_token_ids(tokenizer))
    assert torch.equal(out["draft_token"], verbalisers[out["class_pred"]])  # greedy draft = class prediction
    assert (out["topk_ids"] == out["draft_token"].unsqueeze(-1)).any(-1).all()  # the upload holds the draft
    assert torch.allclose(out["topk_probs"].sum(-1) + out["tail_mass"], torch.ones(6), atol=1e-5)
    assert torch.allclose(out["route_prob"], tiny_slm.head(out["features"]))
    assert torch.equal(out["route"], out["features"][:, 0] > tiny_slm.head.effective_tau())
    assert torch.equal(out["labels"], batch["labels"])


def test_lm_target_learns_the_verbaliser_token(tiny_slm, tokenizer):
    batch = prompts(tokenizer, 8)
    opt = torch.optim.AdamW(tiny_slm.model.parameters(), lr=3e-3)
    first = tiny_slm.lm_target_loss(batch).item()
    for _ in range(40):
        opt.zero_grad()
        tiny_slm.lm_target_loss(batch).backward()
        opt.step()
    assert tiny_slm.lm_target_loss(batch).item() < 0.5 * first
    pred, _ = tiny_slm.classify(batch)
    assert torch.equal(pred, batch["labels"])


def test_distillation_adds_the_kl_to_the_teachers_class_distribution(tiny_llm_folder, tokenizer):
    student = SLMModule(**TINY, teacher=str(tiny_llm_folder), distill_weight=0.5, distill_temperature=2.0).eval()
    batch = prompts(tokenizer, 8)
    logits = student.next_logits(batch)
    plain = student.lm_loss(logits, batch["labels"])
    teacher = LLMRefiner(pretrained=str(tiny_llm_folder)).q_probs(batch).log()  # log-probs: same softmax
    s = torch.log_softmax(student.class_logits(logits) / 2.0, -1)
    t = torch.softmax(teacher.index_select(-1, student._verbalisers) / 2.0, -1)
    kl = (t * (t.log() - s)).sum(-1).mean()
    assert kl.item() > 0
    assert student.lm_target_loss(batch).item() == pytest.approx((plain + 0.5 * 4.0 * kl).item(), rel=1e-4)


def test_distillation_asks_the_teacher_once_per_training_article(tiny_llm_folder, tokenizer, monkeypatch):
    student = SLMModule(**TINY, teacher=str(tiny_llm_folder), distill_weight=0.5).eval()
    batch = prompts(tokenizer, 8)
    calls = []
    real = student.teacher_logits
    monkeypatch.setattr(student, "teacher_logits", lambda b: calls.append(len(b["uid"])) or real(b))
    first = student.lm_target_loss(batch).item()
    assert student.lm_target_loss(batch).item() == pytest.approx(first, rel=1e-6)  # the memo gives the same targets
    assert calls == [8]
    student.on_fit_start()  # a new fit: uids may name other articles
    student.lm_target_loss(batch)
    assert calls == [8, 8]


def test_a_config_teacher_is_the_cached_llm_of_that_config_on_the_students_data(tmp_path, monkeypatch):
    import yaml

    from fedhlm.models import cache

    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    data = {"source": "synthetic", "synthetic_size": 160, "max_length": 32, "batch_size": 32}
    llm_yaml = tmp_path / "llm.yaml"
    llm_yaml.write_text(yaml.safe_dump({
        "model": {"class_path": "fedhlm.models.llm.LLMRefiner", "init_args": {"pretrained": None, **TINY}},
        "data": data, "trainer": {"max_steps": 1, "limit_val_batches": 1, "limit_test_batches": 1}}))
    spec = f"config:{llm_yaml}"
    resolved = cache.resolve_teacher(spec, {**data, "synthetic_size": 200}, progress=False)
    assert resolved.startswith("cache:llm-")
    saved = json.loads((tmp_path / "home" / "models" / resolved[len("cache:"):] / "metrics.json").read_text())
    assert saved["config"]["data"]["synthetic_size"] == 200  # the teacher learnt on the student's corpus
    assert cache.resolve_teacher(spec, {**data, "synthetic_size": 200}, progress=False) == resolved  # cached
    assert cache.resolve_teacher(str(tmp_path), None) == str(tmp_path)  # a folder is left as it is
    with pytest.raises(ValueError, match="resolved on the fit's data"):
        SLMModule(**TINY, teacher=spec)  # the module alone would train the LLM on the wrong data


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_prompt_attention_decides_what_an_early_position_sees_and_is_saved(tiny_llm_folder, tokenizer, tmp_path, mode):
    llm = LLMRefiner(pretrained=str(tiny_llm_folder), prompt_attention=mode).eval()
    batch = prompts(tokenizer, 2)
    ids = batch["input_ids"][:1].clone()
    changed = ids.clone()
    changed[0, 3] = tokenizer.convert_tokens_to_ids("football")
    with torch.no_grad():
        a = llm.model.bert(input_ids=ids).last_hidden_state[0, 1]
        b = llm.model.bert(input_ids=changed).last_hidden_state[0, 1]
    assert torch.allclose(a, b, atol=1e-6) == (mode == "causal")  # position 1 sees position 3 only bidirectionally
    folder = llm.save_pretrained(str(tmp_path / mode))
    again = LLMRefiner(pretrained=folder).eval()  # None: as saved
    assert again.model.config.is_decoder == (mode == "causal")
    assert torch.allclose(again.q_probs(batch), llm.q_probs(batch), atol=1e-6)
    if mode == "bidirectional":
        with pytest.raises(ValueError, match="sessions need prompt_attention: causal"):
            again.session_q("s", ids[0], 0)


def test_sampled_drafts_come_from_the_uploaded_topk(tokenizer):
    slm = SLMModule(**TINY, topk=4, draft="sample")
    out = slm.route_batch(prompts(tokenizer, 16))
    assert (out["topk_ids"] == out["draft_token"].unsqueeze(-1)).any(-1).all()
    p = out["topk_probs"] / out["topk_probs"].sum(-1, keepdim=True)
    assert torch.allclose(out["p_draft"], p[out["topk_ids"] == out["draft_token"].unsqueeze(-1)], atol=1e-6)
    with pytest.raises(ValueError, match="draft must be one of"):
        SLMModule(**TINY, draft="beam")


def pooled_pairs(n: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u = 2 * torch.rand(n, generator=g)
    beta = (0.4 * u + 0.05).clamp(0, 1)
    feats = torch.stack([u, torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g)], dim=-1)
    return u, feats, beta


@pytest.mark.parametrize("engine", sorted(FIT_ENGINES))
def test_fitting_the_slms_head_reaches_the_central_threshold_and_leaves_the_lm_alone(tiny_slm, engine):
    u, feats, beta = pooled_pairs()
    lm_before = {k: v.clone() for k, v in tiny_slm.model.state_dict().items()}
    fit_head(tiny_slm.head, feats, beta, lam=0.45, steps=5, lr=0.05, optimizer="adam", engine=engine)  # warm-up: imports
    result = fit_head(tiny_slm.head, feats, beta, lam=0.45, steps=200, lr=0.05, optimizer="adam", engine=engine)
    target = central_threshold(u, beta, 0.45, method="sigmoid", temperature=float(tiny_slm.head.temperature))
    assert result["tau"] == pytest.approx(target, rel=0.02) and tiny_slm.head.effective_tau() == result["tau"]
    assert result["loss_after"] < result["loss_before"]
    assert result["seconds"] < 3.0
    after = tiny_slm.model.state_dict()
    assert all(torch.equal(lm_before[k], after[k]) for k in lm_before)
    assert all(p.requires_grad for p in tiny_slm.model.parameters())


def test_both_fit_engines_take_the_same_steps():
    _, feats, beta = pooled_pairs(300)
    heads = {name: ThresholdHead(tau=0.3) for name in FIT_ENGINES}
    for name, head in heads.items():
        fit_head(head, feats, beta, lam=0.3, steps=25, lr=0.5, engine=name)
    taus = {name: float(head.tau.detach()) for name, head in heads.items()}
    assert len(set(taus.values())) == 1 and taus["loop"] != 0.3, taus


def test_optimisers_and_fit_engines_are_registries(monkeypatch):
    _, feats, beta = pooled_pairs(100)
    steps_taken = []

    class CountingEngine:
        def fit(self, module, batch, steps):
            steps_taken.append((type(module).__name__, steps, len(batch)))

    monkeypatch.setitem(FIT_ENGINES, "count", CountingEngine)
    head = ThresholdHead(tau=0.3)
    result = fit_head(head, feats, beta, lam=0.3, steps=7, engine="count", weights=torch.ones(100))
    assert steps_taken == [("HeadModule", 7, 3)] and result["tau"] == pytest.approx(0.3)
    torch_head = TorchHead(head, engine=CountingEngine())  # an engine object works as well as its name
    torch_head.fit(feats.numpy(), beta.numpy(), lam=0.3, steps=2, lr=0.1)
    assert steps_taken[-1] == ("HeadModule", 2, 2) and isinstance(TorchHead(head).engine, FIT_ENGINES["loop"])
    monkeypatch.setitem(OPTIMIZERS, "rmsprop", torch.optim.RMSprop)
    assert isinstance(HeadModule(head, optimizer="rmsprop").configure_optimizers(), torch.optim.RMSprop)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        HeadModule(head, optimizer="lbfgs")
    with pytest.raises(ValueError, match="engine must be one of"):
        TorchHead(head, engine="threads")
    with pytest.raises(ValueError, match="engine must be one of"):
        fit_head(head, feats, beta, lam=0.3, engine="threads")


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_central_head_pairs_are_the_teachers_verdicts_on_the_slms_drafts(tiny_slm_folder, tiny_llm_folder, tokenizer, mode):
    central = CentralHeadModule(pretrained=str(tiny_slm_folder), teacher=str(tiny_llm_folder), verify_mode=mode, topk=4)
    batch = prompts(tokenizer)
    feats, beta = central.head_pairs(batch)
    q = LLMRefiner(pretrained=str(tiny_llm_folder)).q_probs(batch)
    view = SLMModule(pretrained=str(tiny_slm_folder), topk=4).route_batch(batch)
    assert torch.allclose(feats, view["features"], atol=1e-6)
    if mode == "greedy":  # beta 1 iff the LLM disagrees
        assert torch.equal(beta, (view["draft_token"] != q.argmax(-1)).float())
    else:
        q_x = q.gather(1, view["draft_token"].unsqueeze(1)).squeeze(1)
        assert torch.allclose(beta, rejection_probability(view["p_draft"], q_x), atol=1e-5)
    assert feats.shape == (6, len(FEATURE_NAMES))


def test_central_head_fit_trains_only_the_head_with_the_slm_in_eval_mode(tiny_slm_folder, tiny_llm_folder, tmp_path):
    from lightning.pytorch import Trainer

    from fedhlm.data.module import NewsDataModule

    # a random SLM's entropy is near log |V| = 10.3: a threshold there has a gradient
    central = CentralHeadModule(pretrained=str(tiny_slm_folder), teacher=str(tiny_llm_folder), topk=4, lam=0.05,
                                lr=0.05, tau=10.0, temperature=1.0, anneal_to=0.5, anneal_decay=0.9)
    lm_before = {k: v.clone() for k, v in central.slm.model.state_dict().items()}
    seen = []
    central.slm.model.bert.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    data = NewsDataModule(source="synthetic", synthetic_size=200, batch_size=16)
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, val_check_interval=2)
    trainer.fit(central, datamodule=data)
    assert seen and not any(seen)  # the features are the frozen SLM's, never with dropout
    assert central.head.tau.item() != 10.0 and float(central.head.temperature) == pytest.approx(
        annealed_temperature(3, 1.0, 0.5, 0.9))
    assert all(torch.equal(lm_before[k], v) for k, v in central.slm.model.state_dict().items())
    assert central.head.tau.item() == pytest.approx(10.0 - 4 * 0.05, abs=1e-3)  # four Adam steps, all one way
    assert {"train_routing_loss", "val_routing_loss", "val_offload_rate", "tau"} <= set(trainer.callback_metrics)
    folder = save_to_cache(central, tmp_path / "head-abc", {"kind": "head"})
    again = SLMModule(pretrained=str(folder), topk=4)
    assert again.head.effective_tau() == pytest.approx(central.head.effective_tau())
    assert float(again.head.temperature) == pytest.approx(float(central.head.temperature))


def test_save_and_reload_keeps_logits_and_head(tmp_path, tiny_slm, tokenizer):
    batch = prompts(tokenizer)
    with torch.no_grad():
        tiny_slm.head.tau.fill_(0.123)
    folder = save_to_cache(tiny_slm, tmp_path / "slm-abc", {"kind": "slm", "test_acc": 0.5})
    assert not (folder / HEAD_FILE).exists()  # an lm fit leaves the head untrained: not saved
    tiny_slm.save_head(folder)  # what a head fit saves with the model
    again = SLMModule(pretrained=str(folder))
    assert torch.allclose(again.route_batch(batch)["class_probs"], tiny_slm.route_batch(batch)["class_probs"], atol=1e-6)
    assert again.head.effective_tau() == pytest.approx(0.123)


# ---- LLM refiner -----------------------------------------------------------------------------
def test_kv_cache_session_gives_the_same_q_as_full_reencoding(tiny_llm, tokenizer):
    ids = tokenizer("markets rallied on tuesday as investors cheered strong earnings", add_special_tokens=False)["input_ids"]
    ids = [tokenizer.cls_token_id, *ids]
    tiny_llm.session_q("a", ids[:3], 0)
    for start, stop in [(3, 4), (4, 7), (7, len(ids))]:
        q = tiny_llm.session_q("a", ids[start:stop], start)
        assert torch.allclose(q, tiny_llm.reencoded_q(ids[:stop]), atol=1e-6)
    assert tiny_llm.sessions["a"].length == len(ids)


def test_session_verification_never_reencodes_the_prefix(tiny_llm, tokenizer):
    ids = [101, *range(2000, 2040)]
    tiny_llm.session_q("s", ids[:-1], 0)
    seen = []
    handle = tiny_llm.model.bert.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        q = tiny_llm.session_q("s", ids[-1:], len(ids) - 1)
        draft = int(q.argmax())
        accepted, token, beta, q_draft = tiny_llm.verify_in_session(
            "s", [], len(ids), torch.tensor([draft]), torch.tensor([1.0]), 0.0, draft, mode="sample"
        )
    finally:
        handle.remove()
    assert seen == [1]  # one new token encoded; the empty follow-up reuses the stored q
    # p' is one-hot on the draft: beta = 1 - q(draft), and a rejection resamples elsewhere
    assert beta == pytest.approx(1 - float(q[draft]), abs=1e-6) and q_draft == pytest.approx(float(q[draft]))
    assert (token == draft) == accepted


def test_sessions_extended_together_match_each_extended_alone(tiny_llm):
    """One forward pass for several sessions of different lengths, each adding a different number of tokens,
    gives every session the q and the cache it would have had alone (padding masked, cut out again)."""
    from fedhlm.models.kv_cache import extend_cache, extend_caches

    m = tiny_llm.model.eval()
    prefixes = [[101, *range(2000, 2000 + n)] for n in (4, 11, 7)]
    new = [[3000], [3001, 3002, 3003], [3004, 3005]]
    with torch.inference_mode():
        caches = [extend_cache(m, torch.tensor([p]), None)[1] for p in prefixes]
        together = extend_caches(m, caches, new)
        for prefix, tokens, (logits, cache) in zip(prefixes, new, together):
            alone, _ = extend_cache(m, torch.tensor([prefix + tokens]), None)
            assert torch.allclose(logits, alone, atol=1e-5) and cache.get_seq_length() == len(prefix) + len(tokens)
            after, _ = extend_cache(m, torch.tensor([[4000]]), cache)  # the cut cache continues like the real one
            assert torch.allclose(after, extend_cache(m, torch.tensor([prefix + tokens + [4000]]), None)[0], atol=1e-5)
        assert [c.get_seq_length() for c in caches] == [len(p) for p in prefixes]  # the inputs were not touched
        with pytest.raises(ValueError, match="at least one new token"):
            extend_caches(m, [caches[0]], [[]])
        opened = extend_caches(m, [None, None], [prefixes[0], prefixes[1]])  # openings in one pass
        for prefix, (logits, cache) in zip(prefixes, opened):
            assert torch.allclose(logits, extend_cache(m, torch.tensor([prefix]), None)[0], atol=1e-5)
            assert cache.get_seq_length() == len(prefix)


def test_a_batch_of_session_requests_serves_each_as_alone_and_fails_only_the_bad_ones(tiny_llm_folder):
    from fedhlm.models.kv_cache import RefinerSessions, SessionDraft

    tiny_llm = LLMRefiner(pretrained=str(tiny_llm_folder), max_sessions=8)
    for sid, n in (("a", 5), ("b", 9)):
        tiny_llm.session_q(sid, [101, *range(2000, 2000 + n)], 0)
    reference = {sid: tiny_llm.reencoded_q(ids) for sid, ids in
                 (("a", [101, *range(2000, 2005), 3000]), ("b", [101, *range(2000, 2009), 3001, 3002]),
                  ("c", [101, 2500, 2501]))}
    requests = [("a", [3000], 6), ("b", [3001, 3002], 10), ("c", [101, 2500, 2501], 0), ("x", [7], 3), ("a", [], 7),
                ("b", [3003], 4)]
    qs = tiny_llm.sessions.extend_many(tiny_llm.model.eval(), requests, tiny_llm.device)
    for i, sid in enumerate("abc"):
        assert torch.allclose(qs[i], reference[sid], atol=1e-5), sid
    assert isinstance(qs[3], SessionMismatch) and "not held" in str(qs[3])  # never opened
    assert torch.equal(qs[4], qs[0])  # nothing new: a's q after the batch, served in order
    assert isinstance(qs[5], SessionMismatch) and "holds 12 tokens" in str(qs[5])
    # the worker's view: greedy verdicts per draft; a draft that is no token of its top-k fails alone
    top = np.array([5, 6], dtype=np.int32), np.array([0.6, 0.4], dtype=np.float32)
    drafts = [SessionDraft("a", [4000], 7, *top, 5), SessionDraft("b", [4001], 12, *top, 99)]
    results = RefinerSessions(tiny_llm).verify_many(drafts, mode="greedy")
    assert isinstance(results[1], Exception) and not isinstance(results[1], SessionMismatch)
    accepted, token, beta, _ = results[0]
    assert token == int(tiny_llm.reencoded_q([101, *range(2000, 2005), 3000, 4000]).argmax()) and accepted == (token == 5)


def test_sessions_are_evicted_least_recently_used_and_out_of_step_requests_refused(tiny_llm):
    tiny_llm.session_q("a", [101, 2000], 0)
    tiny_llm.session_q("b", [101, 2001], 0)
    tiny_llm.session_q("a", [2002], 2)  # a is now the most recent
    tiny_llm.session_q("c", [101], 0)  # max_sessions=2 evicts b
    assert list(tiny_llm.sessions) == ["a", "c"]
    with pytest.raises(SessionMismatch, match="session b: not held"):
        tiny_llm.session_q("b", [2003], 2)
    with pytest.raises(SessionMismatch, match="holds 3 tokens, request starts at 5"):
        tiny_llm.session_q("a", [2003], 5)
    assert tiny_llm.end_session("a") and not tiny_llm.end_session("a")


def test_refiner_verifies_a_batch_of_client_uploads(tiny_slm, tiny_llm, tokenizer):
    batch = prompts(tokenizer)
    upload = tiny_slm.route_batch(batch)
    drafts = [Draft(batch["input_ids"][i, : int(batch["last_index"][i]) + 1].numpy(), upload["topk_ids"][i].numpy(),
                    upload["topk_probs"][i].numpy(), int(upload["draft_token"][i])) for i in range(6)]

    def q_fn(input_ids, mask, last):
        return tiny_llm.q_probs({"input_ids": input_ids, "attention_mask": mask, "last_index": last})

    verdicts = verify_drafts(q_fn, drafts, pad_id=tokenizer.pad_token_id, mode="sample",
                             generator=torch.Generator().manual_seed(0))
    q = tiny_llm.q_probs(batch)
    q_x = q.gather(1, upload["draft_token"].unsqueeze(1)).squeeze(1)
    assert torch.allclose(verdicts.q_draft, q_x, atol=1e-5)
    assert torch.allclose(verdicts.beta, (1 - q_x / upload["p_draft"]).clamp_min(0), atol=1e-5)
    assert torch.equal(verdicts.token[verdicts.accepted], upload["draft_token"][verdicts.accepted])
    classes = tiny_llm.class_of_token(verdicts.token)
    verbalisers = torch.tensor(tiny_llm.verbaliser_ids)
    assert torch.equal(verbalisers[classes[classes >= 0]], verdicts.token[classes >= 0])


# ---- model cache ------------------------------------------------------------------------------
def test_get_or_train_trains_once_and_lists_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path))
    config = {
        "model": TINY,
        "data": {"source": "synthetic", "synthetic_size": 200, "batch_size": 16},
        "trainer": {"max_steps": 3, "limit_val_batches": 1, "limit_test_batches": 2, "accelerator": "cpu"},
    }
    path = get_or_train("slm", config, progress=False)
    metrics = json.loads((path / "metrics.json").read_text())
    assert path.parent == tmp_path / "models" and path.name.startswith("slm-")
    assert metrics["data_source"] == "synthetic" and metrics["params"] > 0 and 0 <= metrics["test_acc"] <= 1
    stamp = (path / "metrics.json").stat().st_mtime
    start = time.perf_counter()
    assert get_or_train("slm", config, progress=False) == path
    assert time.perf_counter() - start < 1.0 and (path / "metrics.json").stat().st_mtime == stamp
    assert latest("slm") == path and [f for f, _ in cached_models()] == [path]
    # a different setting is a different model
    other = {**config, "model": {**TINY, "seed": 1}}
    assert get_or_train("slm", other, progress=False) != path
    assert models_main([]) == 0
    assert "slm-" in capsys.readouterr().out


@pytest.mark.slow
def test_real_models_trained_briefly_on_ag_news_rank_llm_over_slm_over_chance(tmp_path, monkeypatch):
    csv = ag_news_path()
    if csv is None or not (csv.parent / "ag_news_train.csv").is_file():
        pytest.skip("AG News not found (set FEDHLM_DATA or place ../shared/data/ag_news/)")
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path))
    data = {"task": "ag_news", "source": "files", "train_path": str(csv.parent / "ag_news_train.csv"),
            "eval_path": str(csv), "limit": 1200, "eval_limit": 800, "batch_size": 32, "max_length": 48}
    trainer = {"accelerator": "cpu", "limit_val_batches": 0, "num_sanity_val_steps": 0}
    slm = get_or_train("slm", {"data": data, "model": {"lr": 3e-3, "warmup_steps": 10},
                              "trainer": {**trainer, "max_epochs": 3}}, progress=False)
    llm = get_or_train("llm", {"data": data, "model": {"lr": 1e-4, "warmup_steps": 5},
                              "trainer": {**trainer, "max_epochs": 1}}, progress=False)
    slm_acc = json.loads((slm / "metrics.json").read_text())["test_acc"]
    llm_acc = json.loads((llm / "metrics.json").read_text())["test_acc"]
    print(f"AG News brief: SLM {slm_acc:.3f} LLM {llm_acc:.3f}")
    assert llm_acc > slm_acc > 0.4, (llm_acc, slm_acc)


def test_progress_lines_give_step_share_loss_and_eta_without_a_tty() -> None:
    """A log file shows training progress: one line per interval with the share done and an ETA."""
    import io
    from types import SimpleNamespace

    import torch as _torch

    from fedhlm.models.progress import ProgressLines, format_duration

    out = io.StringIO()
    lines = ProgressLines("slm-x", every_s=0.0, stream=out)
    trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2, global_step=0, current_epoch=0)
    lines.on_train_start(trainer, None)
    for step in (1, 5):
        trainer.global_step = step
        lines.on_train_batch_end(trainer, None, {"loss": _torch.tensor(0.5)}, None, step - 1)
    lines.on_train_end(trainer, None)
    text = out.getvalue().splitlines()
    assert text[0] == "training slm-x: 10 optimiser steps, 2 epoch(s)"
    assert text[1].startswith("training slm-x: step 1/10 (10 %), epoch 1/2, loss 0.5000") and "ETA" in text[1]
    assert text[2].startswith("training slm-x: step 5/10 (50 %)") and text[-1].startswith("training slm-x: trained 5 steps")
    assert [format_duration(s) for s in (42, 725, 3720)] == ["42 s", "12 min 05 s", "1 h 02 min"]
