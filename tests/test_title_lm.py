"""The generation task's data and model (issue 18): title-generation pairs and the TitleLM objective."""

from __future__ import annotations

import pytest
import torch

from fedhlm.data import NewsItem, load_tokenizer, prompt_text
from fedhlm.data.objectives import TITLE_SUFFIX, encode_lm_pairs, generation_task, make_collator
from fedhlm.data.task import load_task
from fedhlm.models.title_lm import TitleLM

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def items() -> list[NewsItem]:
    return [NewsItem(0, 0, "Stocks rally", "Shares rose sharply on Tuesday as investors cheered earnings."),
            NewsItem(1, 1, "Team wins the final again", "The home side beat the visitors in a tense match.")]


def test_title_pairs_label_exactly_the_title_and_its_stop_token(tokenizer) -> None:
    batch = encode_lm_pairs(tokenizer, items(), "title", 16)
    for i, item in enumerate(items()):
        start = int(batch["prompt_length"][i])
        prompt = tokenizer.decode(batch["input_ids"][i, :start])
        assert prompt.endswith(TITLE_SUFFIX) and prompt.startswith("[CLS]")  # the suffix survives truncation
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled[-1] == tokenizer.sep_token_id
        assert tokenizer.decode(labelled[:-1]) == item.title.lower()
        assert (batch["labels"][i, :start] == -100).all()  # the description is context, not a target
    with pytest.raises(ValueError, match="data.objective"):
        make_collator("summarise", tokenizer, 64, load_task("ag_news"))


def test_continuation_pairs_cut_each_article_into_its_opening_and_what_follows(tokenizer) -> None:
    """The prompt is [CLS] and at most max_length - 1 tokens, at most half the article; the target is the next
    tokens (at most ContinueTask.max_new), closed by [SEP] only where the article ends there; the reference is
    the target decoded."""
    long = NewsItem(2, 2, "Markets", " ".join(["shares rose again"] * 30))
    task = generation_task("continue")
    pairs = task.pairs(tokenizer, [*items(), long], 8)
    whole = [tokenizer(prompt_text(it), add_special_tokens=False)["input_ids"] for it in [*items(), long]]
    for (prompt, target, stop), ids in zip(pairs, whole):
        cut = len(prompt) - 1
        assert prompt[0] == tokenizer.cls_token_id and prompt[1:] == ids[:cut] and cut == min(7, len(ids) // 2)
        assert target == ids[cut : cut + task.max_new] and stop == (cut + task.max_new >= len(ids))
    assert pairs[0][2] and not pairs[2][2] and len(pairs[2][1]) == task.max_new  # a long article is cut, not closed
    batch = encode_lm_pairs(tokenizer, [*items(), long], "continue", 8)
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == pairs[0][1] + [tokenizer.sep_token_id]
    assert batch["labels"][2][batch["labels"][2] != -100].tolist() == pairs[2][1]  # no stop token: it goes on
    assert task.references(tokenizer, items(), 8)[0] == tokenizer.decode(pairs[0][1])
    with pytest.raises(ValueError, match="data.objective"):
        generation_task("classify")


def test_title_lm_learns_the_titles_it_is_trained_on(tokenizer) -> None:
    """Teacher-forced: a few steps on two pairs drive their loss down and the greedy title tokens right."""
    torch.manual_seed(0)
    model = TitleLM(pretrained=None, **TINY, lr=0.01)
    batch = encode_lm_pairs(tokenizer, items())
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.01)
    before = model._token_loss(batch)["ce"]
    for _ in range(60):
        loss = model.training_step(batch, 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    out = model._token_loss(batch)
    assert out["ce"] < 0.2 * before and out["right"] > 0.9
    assert "agree" not in out  # no teacher, no agreement


def test_a_distilled_title_lm_learns_its_teachers_tokens(tokenizer, tmp_path) -> None:
    """The student, loaded with a saved teacher folder, comes to agree with the teacher's greedy title tokens
    (not the reference titles: the teacher learnt other titles for the same descriptions), and only where
    distillation is on."""

    def fit(model: TitleLM, batch: dict[str, torch.Tensor], steps: int = 60) -> TitleLM:
        optimiser = torch.optim.AdamW(model.parameters(), lr=0.01)
        for _ in range(steps):
            loss = model.training_step(batch, 0)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return model.eval()

    torch.manual_seed(1)
    other = [NewsItem(i.uid, i.label, t, i.description) for i, t in zip(items(), ("Markets fall on fears", "A draw at home"))]
    fit(TitleLM(pretrained=None, **TINY, seed=1), encode_lm_pairs(tokenizer, other)).save_pretrained(
        str(tmp_path / "teacher"))
    batch = encode_lm_pairs(tokenizer, items())

    def trained(weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        student = TitleLM(pretrained=None, **TINY, teacher=str(tmp_path / "teacher"), distill_weight=weight,
                          distill_temperature=1.0)
        return fit(student, batch)._token_loss(batch)

    distilled, plain = trained(10.0), trained(0.0)
    assert distilled["agree"] > 0.8 and plain["agree"] < 0.5
    assert distilled["kl"] < 0.5 * plain["kl"]
    assert plain["right"] > distilled["right"]  # the reference titles pull the other way
    with pytest.raises(ValueError, match="model.teacher"):
        TitleLM(pretrained=None, **TINY, distill_weight=1.0)
