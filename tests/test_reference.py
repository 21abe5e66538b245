"""The reference routers' arithmetic: the uncertainty curve and the oracle on hand-made articles."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.reporting.reference import (oracle_accuracy, oracle_gain_captured, reference_section,
                                        uncertainty_accuracy)

# ten articles: the SLM is right on 6; the LLM on 8; only the LLM is right on articles 0, 1, 2; only the SLM on 9
SLM = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], bool)
LLM = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)
UNC = np.array([0.9, 0.1, 0.8, 0.95, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


def test_the_oracle_sends_only_the_articles_the_llm_fixes_first() -> None:
    base = SLM.mean()  # 0.6
    assert oracle_accuracy(SLM, LLM, 0.0) == pytest.approx(base)
    assert oracle_accuracy(SLM, LLM, 0.1) == pytest.approx(base + 0.1)
    assert oracle_accuracy(SLM, LLM, 0.3) == pytest.approx(base + 0.3)
    assert oracle_accuracy(SLM, LLM, 1.0) == pytest.approx(base + 0.3)  # never sends what the LLM would break
    assert oracle_accuracy(SLM, LLM, 1.0) > LLM.mean()  # above the LLM alone: the two err on different articles


def test_the_uncertainty_curve_sends_the_most_uncertain_first() -> None:
    assert uncertainty_accuracy(UNC, SLM, LLM, 0.0) == pytest.approx(SLM.mean())
    # top 1 is article 3 (both wrong): no change; top 2 adds article 0 (only the LLM right)
    assert uncertainty_accuracy(UNC, SLM, LLM, 0.1) == pytest.approx(0.6)
    assert uncertainty_accuracy(UNC, SLM, LLM, 0.2) == pytest.approx(0.7)
    # top 4 adds article 9 (0.7: only the SLM right) after article 2 (0.8: only the LLM right)
    assert uncertainty_accuracy(UNC, SLM, LLM, 0.3) == pytest.approx(0.8)
    assert uncertainty_accuracy(UNC, SLM, LLM, 0.4) == pytest.approx(0.7)
    assert uncertainty_accuracy(UNC, SLM, LLM, 1.0) == pytest.approx(LLM.mean())
    with pytest.raises(ValueError, match="share"):
        uncertainty_accuracy(UNC, SLM, LLM, 1.5)


def test_gain_captured_is_the_share_of_the_oracles_gain_at_the_same_share() -> None:
    assert oracle_gain_captured(0.7, 0.2, SLM, LLM) == pytest.approx(0.5)  # oracle 0.8 at 20 %: half of +0.2
    assert oracle_gain_captured(0.6, 0.0, SLM, LLM) is None  # nothing to gain at 0 %
    section = reference_section(UNC, SLM, LLM, [0.1, 0.2], "entropy", {"router": (0.7, 0.2)})
    assert section["only_llm_right"] == 3 and section["only_slm_right"] == 1 and section["articles"] == 10
    assert [p["share"] for p in section["at_shares"]] == [0.1, 0.2] and len(section["dense"]) == 101
    assert section["methods"]["router"]["oracle_gain_captured"] == pytest.approx(0.5)
    assert section["methods"]["router"]["uncertainty_at_share"] == pytest.approx(0.7)
