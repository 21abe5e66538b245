"""Reading AG News style CSV files, and undoing AG News' text escapes.

The published AG News CSVs (Zhang, Zhao, LeCun 2015) are three quoted columns
``class,title,description`` with a 1-based class, no header, and text that went through
a lossy escaping: a line break became a backslash (``dwindling\\band`` is "dwindling" +
new line + "band"; ``\\\\`` is a paragraph break), a dollar sign became ``\\$``, and the
``&`` of HTML entities became a space (``who #39;s``, `` quot;``, ``AT amp;T``), while
``&lt;b&gt;`` survived. ``clean_text`` inverts these; ``read_news_csv`` also takes a
two-column ``label,text`` file (title left empty) and an optional header row.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

from fedhlm.data.items import NewsItem

_ENTITY_NAMES = {"quot": '"', "amp": "&", "lt": "<", "gt": ">", "apos": "'", "nbsp": " "}
# "&name;" or " name;" (AG News turned the "&" into a space) or a bare "name;" at a word start
_ENTITY = re.compile(r"(?:[ &]|(?<![A-Za-z0-9#]))(#[0-9]{1,7}|" + "|".join(_ENTITY_NAMES) + r");")
# only real HTML tags: Reuters tickers such as "<GOOG.O>" are text
_TAG = re.compile(r"<\s*/?\s*(?:a|b|i|u|p|br|hr|em|strong|font|span|div|img|sup|sub|li|ul|ol)\b[^<>]*>", re.I)
_BACKSLASHES = re.compile(r"\\+")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_HEADER_WORDS = {"label", "class", "class index", "class_index", "category", "target"}


class DataFileError(ValueError):
    """A data file that cannot be read as the task's CSV; the message names the file and the line."""


def _entity(match: re.Match[str]) -> str:
    name = match.group(1)
    if not name.startswith("#"):
        return _ENTITY_NAMES[name]
    code = int(name[1:])
    if 128 <= code <= 159:  # Windows-1252 code points written as numeric entities (#151; = em dash)
        try:
            return bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            return match.group(0)
    if code in (0, 9, 10, 13) or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return " " if code in (9, 10, 13) else match.group(0)
    return chr(code)


def clean_text(raw: str) -> str:
    """Undo AG News escapes; line breaks are kept as "\\n", other whitespace runs become one space."""
    text = raw.replace("\\$", "$")
    text = _BACKSLASHES.sub("\n", text)
    for _ in range(2):  # "&amp;lt;" needs two passes
        text = _ENTITY.sub(_entity, text)
    text = _TAG.sub(" ", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line where the record starts, fields), blank lines skipped."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataFileError(f"{path}: line {start}: malformed CSV: {err}") from err
            if row and any(field.strip() for field in row):
                yield start, row
            start = reader.line_num + 1


def _is_header(row: list[str]) -> bool:
    return row[0].strip().lower() in _HEADER_WORDS


def read_news_csv(
    path: str | PathLike[str],
    *,
    label_base: int = 1,
    num_classes: int,
    columns: int | None = None,
) -> list[NewsItem]:
    """Read ``class,title,description`` (AG News) or ``label,text`` rows into NewsItems.

    Labels are shifted by ``label_base`` to 0..num_classes-1; uids are the 0-based record
    index. Every row must have the column count of the first (``columns`` pins it).
    A malformed file raises ValueError naming the path and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"news CSV not found: {path}")
    items: list[NewsItem] = []
    width = columns
    try:
        for count, (line, row) in enumerate(_records(path)):
            if count == 0 and _is_header(row):
                width = width or len(row)
                continue
            width = width or len(row)
            if width not in (2, 3):
                raise DataFileError(f"{path}: line {line}: expected 3 columns (class,title,description) "
                                 f"or 2 (label,text), got {len(row)}")
            if len(row) != width:
                raise DataFileError(f"{path}: line {line}: expected {width} columns, got {len(row)}")
            try:
                label = int(row[0].strip()) - label_base
            except ValueError:
                raise DataFileError(f"{path}: line {line}: label {row[0]!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise DataFileError(f"{path}: line {line}: label {row[0].strip()} is outside "
                                 f"{label_base}..{label_base + num_classes - 1}")
            title, description = ("", row[1]) if width == 2 else (row[1], row[2])
            title, description = clean_text(title), clean_text(description)
            if not title and not description:
                raise DataFileError(f"{path}: line {line}: empty text")
            items.append(NewsItem(uid=len(items), label=label, title=title, description=description))
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err})") from err
    if not items:
        raise DataFileError(f"{path}: line 1: empty file (no data rows)")
    return items
