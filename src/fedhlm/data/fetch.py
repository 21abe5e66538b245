"""Download the official AG News CSVs (``fedhlm data fetch ag_news``).

Source: the CSVs of Zhang, Zhao and LeCun (2015) as mirrored in the CharCnn_Keras
repository. Their SHA-256 digests are not recorded here yet (this project was built
offline and we do not write down digests we have not measured): until they are, a
download is checked by its shape instead (3 columns, classes 1..4, 120,000 train rows and
7,600 test rows, balanced across classes) and the digest is printed so it can be pinned
in AG_NEWS_SHA256. A file lands in place only after it passed the checks.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

from fedhlm.data.reader import read_news_csv

AG_NEWS_BASE_URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"
AG_NEWS_ROWS: dict[str, int] = {"train.csv": 120_000, "test.csv": 7_600}
# digests of the official files; None = not pinned yet (checked by row counts instead)
AG_NEWS_SHA256: dict[str, str | None] = {"train.csv": None, "test.csv": None}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_ag_news_file(path: Path, *, rows: int, sha256: str | None = None) -> str:
    """The SHA-256 of ``path``; ValueError unless it is an AG News CSV of ``rows`` balanced rows
    (and has the digest ``sha256`` when one is given)."""
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{path}: SHA-256 {digest} does not match the expected {sha256}")
    items = read_news_csv(path, columns=3, num_classes=4)
    if len(items) != rows:
        raise ValueError(f"{path}: {len(items)} rows, expected {rows}")
    counts = Counter(it.label for it in items)
    if len(set(counts.values())) != 1 or len(counts) != 4:
        raise ValueError(f"{path}: classes are not balanced over 4 labels: {dict(sorted(counts.items()))}")
    return digest


def fetch_ag_news(
    dest: str | PathLike[str],
    *,
    base_url: str = AG_NEWS_BASE_URL,
    rows: Mapping[str, int] = AG_NEWS_ROWS,
    sha256: Mapping[str, str | None] = AG_NEWS_SHA256,
    force: bool = False,
    timeout: float = 60.0,
) -> dict[Path, str]:
    """Download and check each file of ``rows`` into ``dest``; return {path: sha256}.

    Files already in ``dest`` that pass the checks are kept unless ``force``. Without a
    network the error says so and names the URL; nothing half-written is left behind.
    """
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[Path, str] = {}
    for name, expected_rows in rows.items():
        target = folder / name
        if target.is_file() and not force:
            try:
                out[target] = check_ag_news_file(target, rows=expected_rows, sha256=sha256.get(name))
                continue
            except ValueError:
                pass  # a broken earlier copy: fetch it again
        url = f"{base_url.rstrip('/')}/{name}"
        partial = folder / f".{name}.part"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as f:
                while block := response.read(1 << 20):
                    f.write(block)
            out[target] = check_ag_news_file(partial, rows=expected_rows, sha256=sha256.get(name))
            os.replace(partial, target)
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(
                f"cannot download {url}: {getattr(err, 'reason', err)} (offline? copy train.csv and test.csv "
                f"into {folder} by hand, or point FEDHLM_DATA at them)"
            ) from err
        finally:
            partial.unlink(missing_ok=True)
    return out
