"""A generated news-like corpus, for runs without AG News (CI, quick demos).

Each topic has its own vocabulary; shared words carry no topic; a tunable share of
"hard" articles mixes in the words of a second topic, the label's topic ahead by one or
two words only, so a small model is unsure on exactly those while a model that reads the
whole article can still count the majority. All
words are whole tokens of the uncased BERT WordPiece vocabulary (a test checks it), so
prompt lengths in tokens equal lengths in words.
"""

from __future__ import annotations

import numpy as np

from fedhlm.data.items import NewsItem

# class order follows the AG News task: World, Sports, Business, Sci/Tech (more topics for more classes)
TOPIC_WORDS: tuple[tuple[str, ...], ...] = (
    (
        "government", "minister", "president", "election", "parliament", "war", "troops",
        "military", "embassy", "diplomat", "treaty", "refugees", "rebels", "ceasefire",
        "prime", "border", "sanctions", "protest", "capital", "nation", "foreign", "peace",
        "army", "militants", "bombing", "hostage", "vote", "opposition", "regime", "summit",
        "iraq", "israel", "palestinian", "afghanistan", "iran", "korea", "nuclear", "soldiers",
        "kidnapped", "ambassador",
    ),
    (
        "season", "team", "coach", "player", "league", "championship", "victory", "defeat",
        "score", "goal", "tournament", "cup", "olympic", "medal", "striker", "quarterback",
        "pitcher", "inning", "touchdown", "playoffs", "stadium", "fans", "injury", "squad",
        "champion", "tennis", "golf", "soccer", "football", "baseball", "basketball", "hockey",
        "cricket", "rugby", "match", "yankees", "midfielder", "homer", "defender", "referee",
    ),
    (
        "company", "shares", "stock", "profit", "revenue", "earnings", "quarterly", "investors",
        "bank", "sales", "prices", "economy", "inflation", "interest", "rates", "dollar",
        "merger", "acquisition", "billion", "executive", "retail", "airline", "bankruptcy",
        "debt", "loan", "fund", "analysts", "forecast", "consumer", "demand", "firm", "stocks",
        "retailer", "insurance", "investment", "bonds", "treasury", "wall", "market", "mortgage",
    ),
    (
        "software", "computer", "internet", "technology", "microsoft", "google", "apple", "web",
        "online", "users", "search", "data", "network", "wireless", "mobile", "chip", "intel",
        "linux", "virus", "hacker", "space", "nasa", "scientists", "research", "researchers",
        "planet", "mars", "telescope", "species", "climate", "digital", "server", "browser",
        "email", "laptop", "robot", "windows", "processor", "astronomers", "satellite",
    ),
    (
        "film", "actor", "actress", "singer", "album", "band", "concert", "director", "movie",
        "oscar", "award", "festival", "chart", "music", "theatre", "comedy", "drama", "television",
        "series", "star", "celebrity", "premiere", "box", "office", "hollywood", "studio", "song",
        "tour", "soundtrack", "novel", "author", "gallery", "musical", "dance", "radio", "show",
        "sequel", "audience", "critics", "rapper",
    ),
)
# topic-free words every article draws from (the margin of an easy article is the
# topic words' share against these)
SHARED_WORDS: tuple[str, ...] = (
    "new", "said", "report", "officials", "week", "year", "monday", "tuesday", "wednesday",
    "thursday", "friday", "plan", "group", "announced", "record", "top", "first", "second",
    "last", "end", "lead", "move", "future", "deal", "news", "expected", "major", "big",
    "long", "high", "national", "state", "power", "control", "update", "today", "early",
    "late", "agreement", "security",
)
FUNCTION_WORDS: tuple[str, ...] = ("the", "a", "of", "in", "on", "to", "for", "and", "with", "as", "at", "by")

# share of topic-free words in every article
SHARED_SHARE = 0.3


def _article_words(rng: np.random.Generator, count: int, label: int, other: int, hard: bool) -> list[str]:
    """``count`` content words: shared ones, and topic words of the label (easy) or of the
    label and ``other`` with the label ahead by the smallest margin, 1 or 2 words (hard)."""
    topical = max(1, count - int(rng.binomial(count, SHARED_SHARE)))
    second = (topical - 1) // 2 if hard else 0
    sources = np.array([0] * (topical - second) + [1] * second + [2] * (count - topical))
    rng.shuffle(sources)
    pools = (TOPIC_WORDS[label], TOPIC_WORDS[other], SHARED_WORDS)
    return [pools[s][rng.integers(len(pools[s]))] for s in sources]


def _sentence(rng: np.random.Generator, words: list[str]) -> str:
    out: list[str] = []
    for i, word in enumerate(words):
        if i and rng.random() < 0.45:
            out.append(FUNCTION_WORDS[rng.integers(len(FUNCTION_WORDS))])
        out.append(word)
    return " ".join(out)


def synthetic_corpus(
    n: int, *, seed: int = 0, hard_fraction: float = 0.2, num_classes: int = 4
) -> list[NewsItem]:
    """``n`` generated articles, labels balanced (counts differ by at most one), same for the same seed.

    A title has 3-6 content words, a description 12-22, about 30% of them topic-free;
    ``hard_fraction`` of the articles mix a second topic in, the label ahead by one or two
    topic words.
    """
    if n < 0:
        raise ValueError(f"synthetic corpus size must be >= 0, got {n}")
    if not 2 <= num_classes <= len(TOPIC_WORDS):
        raise ValueError(f"num_classes must be in 2..{len(TOPIC_WORDS)}, got {num_classes}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes)
    items = []
    for uid, label in enumerate(labels.tolist()):
        hard = rng.random() < hard_fraction
        other = (label + 1 + int(rng.integers(num_classes - 1))) % num_classes
        n_title = int(rng.integers(3, 7))
        words = _article_words(rng, n_title + int(rng.integers(12, 23)), label, other, hard)
        title, body = words[:n_title], words[n_title:]
        cut = int(rng.integers(5, len(body) - 4))
        description = f"{_sentence(rng, body[:cut])} . {_sentence(rng, body[cut:])} ."
        items.append(NewsItem(uid=uid, label=label, title=" ".join(title).capitalize(), description=description))
    return items
