"""What one news article is, and how it becomes a classification prompt.

The paper's evaluation is AG News topic classification done as one-token generation: the
model reads ``"{title} . {description} topic :"`` and the next token is the class
verbaliser. The verbalisers are single tokens of the MiniLM WordPiece vocabulary, so the
label is exactly one routed token.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class NewsItem:
    """One article: a stable id (row or generation index), a class index 0..C-1 and its text."""

    uid: int
    label: int
    title: str
    description: str


def prompt_text(item: NewsItem) -> str:
    """``"{title} . {description}"`` on one line (all whitespace runs become one space).

    A CSV without titles (``label,text``) gives just the description.
    """
    title = " ".join(item.title.split())
    description = " ".join(item.description.split())
    return f"{title} . {description}".strip() if title else description
