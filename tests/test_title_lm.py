"""The generation task's data and model (issue 18): title-generation pairs and the TitleLM objective."""

from __future__ import annotations

import pytest
import torch

from fedhlm.data import NewsItem, load_tokenizer
from fedhlm.data.encoding import TITLE_SUFFIX, encode_title_pairs, make_collator
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
    batch = encode_title_pairs(tokenizer, items(), max_length=16)
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


def test_title_lm_learns_the_titles_it_is_trained_on(tokenizer) -> None:
    """Teacher-forced: a few steps on two pairs drive their loss down and the greedy title tokens right."""
    torch.manual_seed(0)
    model = TitleLM(pretrained=None, **TINY, lr=0.01)
    batch = encode_title_pairs(tokenizer, items())
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.01)
    before, _ = model._token_loss(batch)
    for _ in range(60):
        loss, _ = model._token_loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    after, right = model._token_loss(batch)
    assert after < 0.2 * before and right > 0.9
