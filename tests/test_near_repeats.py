"""Near repeats: another outlet's version of a story as a repeat delivery (issue 16's paraphrase-level repeats)."""

from __future__ import annotations

import numpy as np

from fedhlm.data.items import NewsItem, prompt_text
from fedhlm.reporting.summary import TokenRecord, reuse_by_delivery
from fedhlm.simulation.workload import outlet_version, plan_repeats

STORY = NewsItem(7, 3, "Hackers Target Flaw in Microsoft's JPEG",
                 "NEW YORK (AP) -- In a harbinger of security threats to come, hackers have exploited a newly "
                 "announced flaw in Microsoft's software that lets them take over a computer through a picture.")


def words(text: str) -> set[str]:
    return set(text.lower().split())


def test_another_outlets_version_keeps_the_story_and_label_but_not_the_text() -> None:
    rng = np.random.default_rng(0)
    versions = [outlet_version(STORY, rng, uid=100 + i) for i in range(20)]
    original = words(prompt_text(STORY))
    for v in versions:
        assert v.label == STORY.label and v.uid >= 100 and prompt_text(v) != prompt_text(STORY)
        assert "(AP)" not in v.description and not v.description.startswith("NEW YORK")
        overlap = len(words(prompt_text(v)) & original) / len(original)
        assert 0.4 <= overlap < 1.0, overlap  # mostly the same words, never all of them
    assert len({prompt_text(v) for v in versions}) > 5  # versions differ from each other too


def test_near_repeats_are_a_share_of_the_same_deliveries() -> None:
    first = [(f"c{i % 8}", i % 4) for i in range(400)]
    assignment = {f"c{i}": f"e{i % 2}" for i in range(8)}
    kw = dict(deliveries=3.0, zipf_s=1.0, locality=0.8, seed=0)
    exact = plan_repeats(first, assignment, 4, **kw)
    mixed = plan_repeats(first, assignment, 4, near=0.5, **kw)
    assert [(r.index, r.client_id, r.round) for r in exact] == [(r.index, r.client_id, r.round) for r in mixed]
    share = np.mean([r.near for r in mixed])
    assert not any(r.near for r in exact) and 0.4 < share < 0.6


def test_reuse_is_reported_apart_for_first_deliveries_exact_and_near_repeats() -> None:
    def rec(uid: int, route: str, peer: int | None, label: int = 1, draft: int = 1) -> TokenRecord:
        final = peer if peer is not None else draft
        return TokenRecord("c0", 0, uid, draft, final, route, peer_token=peer, label=label)

    records = [rec(1, "llm", None), rec(2, "peer", 1), rec(3, "peer", 0), rec(4, "local", None, draft=0)]
    out = reuse_by_delivery(records, repeat_of={2: 1, 3: 1, 4: 1}, near={3, 4})
    assert out["first"] == {**out["first"], "tokens": 1, "llm": 1, "reused": 0}
    assert out["exact_repeat"]["reused"] == 1 and out["exact_repeat"]["label_error"] == 0.0
    assert out["near_repeat"]["tokens"] == 2 and out["near_repeat"]["reused"] == 1
    assert out["near_repeat"]["label_error"] == 1.0 and out["near_repeat"]["slm_error_same_tokens"] == 0.0
