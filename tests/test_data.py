"""Reading, generating, resolving and encoding the news data."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import fedhlm.data.sources as sources
from fedhlm.data import (
    NewsItem,
    TaskError,
    encode_prompts,
    fetch_ag_news,
    load_tokenizer,
    prompt_text,
    load_task,
    read_news_csv,
    resolve_corpus,
    synthetic_corpus,
    verbaliser_token_ids,
)
from fedhlm.cli.data import main
from fedhlm.data.synthetic import FUNCTION_WORDS, SHARED_WORDS, TOPIC_WORDS

REPO = Path(__file__).resolve().parents[1]
AG_NEWS_DEV = Path(os.environ.get("FEDHLM_DATA") or REPO / ".." / "shared" / "data" / "ag_news" / "ag_news_dev.csv")
if AG_NEWS_DEV.is_dir():
    AG_NEWS_DEV = AG_NEWS_DEV / "ag_news_dev.csv"
needs_ag_news = pytest.mark.skipif(not AG_NEWS_DEV.is_file(), reason=f"AG News slice absent at {AG_NEWS_DEV}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def no_ag_news(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every place AG News is looked for points into an empty temporary folder."""
    monkeypatch.delenv("FEDHLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- reader -----------------------------------------------------------------------------

def test_reader_undoes_csv_quoting_and_ag_news_escapes(tmp_path: Path) -> None:
    csv_text = (
        '"3","Wall St. Bears Claw Back (Reuters)","Reuters - Wall Street #39;s dwindling\\band of '
        'ultra-cynics. Merck  amp; Co. paid \\$27,  quot;a lot, quot; said AT amp;T."\n'
        '"2","Golfer Cleared of Not Yelling \'Fore\'","A jury heard ""Fore!"" yelled &lt;b&gt;...&lt;/b&gt;\\\\Next"\n'
        '"4","Two\nline title","Dell Inc. &lt;DELL.O&gt; said  #151; twice"\n'
    )
    items = read_news_csv(_write(tmp_path / "news.csv", csv_text), num_classes=4)
    assert [it.label for it in items] == [2, 1, 3]
    assert [it.uid for it in items] == [0, 1, 2]
    assert items[0].description == (
        "Reuters - Wall Street's dwindling\nband of ultra-cynics. Merck & Co. paid $27, \"a lot,\" said AT&T."
    )
    assert items[1].title == "Golfer Cleared of Not Yelling 'Fore'"
    assert items[1].description == 'A jury heard "Fore!" yelled ...\nNext'
    assert items[2].title == "Two\nline title"
    assert items[2].description == "Dell Inc. <DELL.O> said \u2014 twice"
    assert prompt_text(items[0]) == (
        "Wall St. Bears Claw Back (Reuters) . Reuters - Wall Street's dwindling band of "
        'ultra-cynics. Merck & Co. paid $27, "a lot," said AT&T.'
    )


def test_reader_takes_label_text_csv_with_header(tmp_path: Path) -> None:
    items = read_news_csv(_write(tmp_path / "lt.csv", "label,text\n0,hello world\n3,\"a, b\"\n"), label_base=0, num_classes=4)
    assert items == [NewsItem(0, 0, "", "hello world"), NewsItem(1, 3, "", "a, b")]
    assert prompt_text(items[1]) == "a, b"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ('"1","a","b"\n"2","c"\n', 2, "expected 3 columns, got 2"),
        ('"1","a","b"\n"2","multi\nline","x"\n"x","c","d"\n', 4, "not an integer"),
        ('"1","a","b"\n\n"5","c","d"\n', 3, "outside 1..4"),
        ('"1","a","b","c"\n', 1, "got 4"),
        ("", 1, "empty file"),
        ("\n\n", 1, "empty file"),
        ('"1","a","b"\n"2","","  "\n', 2, "empty text"),
        ('"1","a"b","c"\n', 1, "malformed CSV"),
    ],
)
def test_malformed_csv_error_names_path_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=f"bad.csv: line {line}: .*{what}") as err:
        read_news_csv(path, num_classes=4)
    assert str(path) in str(err.value)


def test_missing_csv_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_news_csv(tmp_path / "nope.csv", num_classes=4)


@needs_ag_news
def test_real_ag_news_slice_reads_5600_rows_1400_per_class_without_escapes() -> None:
    items = read_news_csv(AG_NEWS_DEV, num_classes=4)
    assert len(items) == 5600
    assert Counter(it.label for it in items) == {0: 1400, 1: 1400, 2: 1400, 3: 1400}
    assert items[0] == NewsItem(
        0, 1, "Boro left feeling Blue",
        "Accepting mediocrity has been part and parcel of following Middlesbrough over the years, "
        "yet this campaign was supposed to bring something new.",
    )
    text = " ".join(it.title + " " + it.description for it in items)
    for leftover in ("#39;", " quot;", "amp;", "&lt;", "\\"):
        assert leftover not in text


# --- synthetic corpus -------------------------------------------------------------------

def test_synthetic_corpus_is_deterministic_and_balanced() -> None:
    a, b = synthetic_corpus(1000, seed=4), synthetic_corpus(1000, seed=4)
    assert a == b
    assert a != synthetic_corpus(1000, seed=5)
    assert [it.uid for it in a] == list(range(1000))
    assert Counter(it.label for it in a) == {0: 250, 1: 250, 2: 250, 3: 250}
    assert sorted(Counter(it.label for it in synthetic_corpus(1002, seed=0)).values()) == [250, 250, 251, 251]
    assert set(Counter(it.label for it in synthetic_corpus(30, num_classes=3)).values()) == {10}


def _topic_counts(item: NewsItem) -> list[int]:
    words = prompt_text(item).lower().split()
    return [sum(w in set(topic) for w in words) for topic in TOPIC_WORDS]


def test_hard_articles_mix_a_second_topic_one_or_two_words_behind_the_label() -> None:
    easy = [_topic_counts(it) for it in synthetic_corpus(400, seed=1, hard_fraction=0.0)]
    hard_items = synthetic_corpus(400, seed=1, hard_fraction=1.0)
    hard = [_topic_counts(it) for it in hard_items]
    assert all(sorted(c)[-2] == 0 for c in easy)  # one topic only
    margins = Counter(c[it.label] - max(c[: it.label] + c[it.label + 1 :]) for it, c in zip(hard_items, hard))
    assert set(margins) == {1, 2}
    assert sum(sorted(c)[-3] == 0 for c in hard) == len(hard)  # exactly two topics mixed
    mixed = Counter(it.label for it in synthetic_corpus(1000, seed=2, hard_fraction=0.25)
                    if sorted(_topic_counts(it))[-2] > 0)
    assert 200 <= sum(mixed.values()) <= 300


def test_synthetic_vocabulary_is_whole_wordpiece_tokens(tokenizer) -> None:
    assert [len(t) for t in TOPIC_WORDS] == [40, 40, 40, 40, 40]
    words = [w for t in TOPIC_WORDS for w in t] + list(SHARED_WORDS) + list(FUNCTION_WORDS)
    assert len(words) == len(set(words))  # topics and shared words do not overlap
    assert [w for w in words if tokenizer.tokenize(w) != [w]] == []


# --- tokens -----------------------------------------------------------------------------

def test_verbalisers_are_single_wordpiece_tokens(tokenizer) -> None:
    task = load_task("ag_news")
    ids = verbaliser_token_ids(tokenizer, task)
    assert task.num_classes == 4 and task.class_names == ("World", "Sports", "Business", "Sci/Tech")
    assert ids == [2088, 2998, 2449, 2671]
    assert tokenizer.convert_ids_to_tokens(ids) == list(task.verbalisers)
    bbc = load_task("bbc_news")
    assert tokenizer.convert_ids_to_tokens(verbaliser_token_ids(tokenizer, bbc)) == list(bbc.verbalisers)
    assert bbc.num_classes == 5 and bbc.eval == ()


def _task_yaml(path: Path, verbalisers: list[str], **extra: str) -> Path:
    classes = "".join(f"  - {{name: c{i}, verbaliser: {v}}}\n" for i, v in enumerate(verbalisers))
    fields = "".join(f"{k}: {v}\n" for k, v in {"train": "[t.csv]", **extra}.items())
    return _write(path, f"name: mine\n{fields}classes:\n{classes}")


def test_a_verbaliser_that_is_not_one_token_is_refused_by_name(tokenizer, tmp_path: Path) -> None:
    task = load_task(_task_yaml(tmp_path / "t.yaml", ["world", "cryptocurrency"]))
    with pytest.raises(TaskError, match=r"classes\[1\].verbaliser 'cryptocurrency' is not one known token"):
        verbaliser_token_ids(tokenizer, task)


def test_task_files_are_validated_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="verbalisers must differ"):
        load_task(_task_yaml(tmp_path / "a.yaml", ["world", "world"]))
    with pytest.raises(TaskError, match="at least 2 classes"):
        load_task(_task_yaml(tmp_path / "b.yaml", ["world"]))
    with pytest.raises(TaskError, match=r"unknown field\(s\) \['colour'\]"):
        load_task(_task_yaml(tmp_path / "c.yaml", ["world", "sports"], colour="red"))
    with pytest.raises(TaskError, match="label_base: must be an integer"):
        load_task(_task_yaml(tmp_path / "d.yaml", ["world", "sports"], label_base="one"))
    with pytest.raises(TaskError, match="shipped tasks: ag_news, bbc_news"):
        load_task("imdb")


def test_encode_prompts_truncates_the_article_but_keeps_the_suffix(tokenizer) -> None:
    long = NewsItem(7, 2, "Stocks", " ".join(["shares rose sharply"] * 40))
    batch = encode_prompts(tokenizer, [long], max_length=16)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert batch["input_ids"].shape == (1, 16)
    assert tokens[:4] == ["[CLS]", "stocks", ".", "shares"]
    assert tokens[-2:] == ["topic", ":"] == tokenizer.tokenize(load_task("ag_news").prompt_suffix)
    assert "[SEP]" not in tokens
    assert batch["last_index"].tolist() == [15]
    assert batch["labels"].tolist() == [2] and batch["uid"].tolist() == [7]


def test_encode_prompts_pads_right_and_last_index_points_at_the_colon(tokenizer) -> None:
    items = [NewsItem(0, 0, "Peace talks", "resume in Cairo today"), NewsItem(1, 3, "", "Linux")]
    batch = encode_prompts(tokenizer, items, max_length=64)
    colon = tokenizer.convert_tokens_to_ids(":")
    ids, mask, last = batch["input_ids"], batch["attention_mask"], batch["last_index"]
    assert ids.dtype == mask.dtype == last.dtype == batch["labels"].dtype == torch.long
    assert last.tolist() == [9, 3]  # [CLS] peace talks . resume in cairo today topic : / [CLS] linux topic :
    assert ids.shape == (2, 10)
    assert ids[torch.arange(2), last].tolist() == [colon, colon]
    assert mask.sum(dim=1).tolist() == [10, 4]
    assert ids[1, 4:].tolist() == [tokenizer.pad_token_id] * 6
    assert (ids[:, 0] == tokenizer.cls_token_id).all()


def test_encode_prompts_rejects_a_length_without_room_for_the_article(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length=3"):
        encode_prompts(tokenizer, [NewsItem(0, 0, "a", "b")], max_length=3)


def test_load_tokenizer_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_tokenizer_here"):
        load_tokenizer(tmp_path / "no_tokenizer_here")


# --- sources ----------------------------------------------------------------------------

AG = load_task("ag_news")


def test_auto_falls_back_to_synthetic_loudly_when_no_data(no_ag_news: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedhlm.data.sources"):
        corpus = resolve_corpus(AG, "auto", synthetic_size=40, seed=2)
    assert corpus.name == "synthetic"
    assert corpus.train == synthetic_corpus(40, seed=2)
    assert corpus.eval and {it.description for it in corpus.eval}.isdisjoint(it.description for it in corpus.train)
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_files_asked_for_and_missing_names_the_paths_tried(no_ag_news: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tried: .*ag_news_train.csv") as err:
        resolve_corpus(AG, "files")
    assert str(no_ag_news / "repo") in str(err.value)
    with pytest.raises(FileNotFoundError, match="elsewhere.csv"):
        resolve_corpus(AG, "auto", no_ag_news / "elsewhere.csv")


@pytest.mark.parametrize("where", ["missing.csv", "empty-folder"])
def test_fedhlm_data_without_the_files_is_an_error_not_a_fallback(no_ag_news: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   where: str) -> None:
    """Issue 19, minor: FEDHLM_DATA at a missing file warned and used other data; an empty folder fell back silently.
    The user said where the data is: it is an error, even where ../shared/data holds the task's files."""
    (no_ag_news / "empty-folder").mkdir()
    shared = no_ag_news / "repo" / ".." / "shared" / "data" / "ag_news"
    shared.mkdir(parents=True)
    _write(shared / "ag_news_train.csv", '"1","a","b"\n"2","c","d"\n')
    monkeypatch.setenv("FEDHLM_DATA", str(no_ag_news / where))
    with pytest.raises(FileNotFoundError, match=f"FEDHLM_DATA=.*{where} holds no ag_news training file"):
        resolve_corpus(AG, "auto")
    monkeypatch.delenv("FEDHLM_DATA")
    assert len(resolve_corpus(AG, "auto").train) == 2  # the shared folder, without the variable


def test_env_folder_with_official_csvs_is_found(no_ag_news: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = no_ag_news / "full" / "ag_news"
    folder.mkdir(parents=True)
    _write(folder / "train.csv", '"1","a","b"\n"2","c","d"\n"3","e","f"\n')
    _write(folder / "test.csv", '"4","g","h"\n')
    monkeypatch.setenv("FEDHLM_DATA", str(folder.parent))  # a data root holding the task's folder
    corpus = resolve_corpus(AG, "auto")
    assert corpus.name == "ag_news" and [it.label for it in corpus.train] == [0, 1, 2]
    assert [it.label for it in corpus.eval] == [3] and corpus.eval_file.endswith("test.csv")


def test_training_articles_also_in_the_evaluation_file_are_dropped_by_text(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", '"1","Same story","Told  here"\n"2","Other","x"\n"3","Third","y"\n')
    evaluation = _write(tmp_path / "eval.csv", '"4","unrelated","z"\n"1","same STORY","told here"\n')
    corpus = resolve_corpus(AG, "files", train, evaluation)
    assert [it.title for it in corpus.train] == ["Other", "Third"] and corpus.dropped_overlap == 1
    assert {it.uid for it in corpus.eval} == {0, 1}


@needs_ag_news
def test_the_real_train_and_eval_files_share_no_article(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDHLM_DATA", str(AG_NEWS_DEV.parent))
    corpus = resolve_corpus(AG, "auto")
    assert corpus.name == "ag_news" and len(corpus.eval) == 5600
    if corpus.train_file.endswith("ag_news_train.csv"):
        assert len(corpus.train) + corpus.dropped_overlap == 38650
    assert {sources.text_key(it) for it in corpus.train}.isdisjoint(sources.text_key(it) for it in corpus.eval)


def test_a_single_file_task_carves_its_test_split(tmp_path: Path) -> None:
    from fedhlm.data import NewsDataModule

    task = _task_yaml(tmp_path / "five.yaml", ["business", "entertainment", "politics", "sport", "technology"])
    rows = "".join(f'"{1 + i % 5}","title {i}","text number {i}"\n' for i in range(100))
    data = _write(tmp_path / "five.csv", rows)
    dm = NewsDataModule(task=str(task), source="files", train_path=str(data), holdout=(0.1, 0.1, 0.2))
    dm.setup()
    assert dm.splits.sizes() == {"train": 60, "val": 10, "calib": 10, "test": 20}
    assert Counter(it.label for it in dm.splits.test) == {c: 4 for c in range(5)}
    with pytest.raises(ValueError, match="data.holdout: task 'mine' has no evaluation file"):
        NewsDataModule(task=str(task), source="files", train_path=str(data)).setup()
    with pytest.raises(ValueError, match="data.source: must be one of"):
        resolve_corpus(AG, "imdb")


def test_a_training_file_too_small_for_its_splits_is_refused_at_setup(tmp_path: Path) -> None:
    """Issue 19, minor: a 1-row CSV passed `fedhlm data info` (train=1, val=0, calib=0) and failed obscurely later."""
    from fedhlm.data import NewsDataModule
    from fedhlm.data.reader import DataFileError

    task = _task_yaml(tmp_path / "five.yaml", ["business", "entertainment", "politics", "sport", "technology"])
    data = _write(tmp_path / "one.csv", '"1","title","text"\n')
    with pytest.raises(DataFileError, match=r"one.csv: 1 training article\(s\) are too few to carve the validation"):
        NewsDataModule(task=str(task), source="files", train_path=str(data), holdout=(0.1, 0.1, 0.2)).setup()


# --- fetch ------------------------------------------------------------------------------

def _mirror(folder: Path) -> Path:
    folder.mkdir()
    _write(folder / "train.csv", "".join(f'"{c}","t{i}","d{i}"\n' for i in range(2) for c in (1, 2, 3, 4)))
    _write(folder / "test.csv", "".join(f'"{c}","t","d"\n' for c in (1, 2, 3, 4)))
    return folder


def test_fetch_checks_rows_and_keeps_nothing_that_failed(tmp_path: Path) -> None:
    mirror = _mirror(tmp_path / "mirror")
    rows = {"train.csv": 8, "test.csv": 4}
    got = fetch_ag_news(tmp_path / "ok", base_url=mirror.as_uri(), rows=rows)
    assert {p.name: d for p, d in got.items()} == {
        n: hashlib.sha256((mirror / n).read_bytes()).hexdigest() for n in ("train.csv", "test.csv")
    }
    assert (tmp_path / "ok" / "train.csv").read_bytes() == (mirror / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="8 rows, expected 9"):
        fetch_ag_news(tmp_path / "bad", base_url=mirror.as_uri(), rows={"train.csv": 9})
    with pytest.raises(ValueError, match="does not match"):
        fetch_ag_news(tmp_path / "bad", base_url=mirror.as_uri(), rows=rows, sha256={"train.csv": "0" * 64})
    assert list((tmp_path / "bad").iterdir()) == []


def test_fetch_offline_error_names_the_url(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="127.0.0.1:9/train.csv"):
        fetch_ag_news(tmp_path, base_url="http://127.0.0.1:9", timeout=5)
    assert list(tmp_path.iterdir()) == []


# --- data module and CLI ----------------------------------------------------------------

def test_data_module_splits_once_and_yields_prompt_batches(tokenizer) -> None:
    from fedhlm.data import NewsDataModule

    dm = NewsDataModule(source="synthetic", synthetic_size=200, batch_size=16, max_length=32, seed=3,
                        holdout=(0.1, 0.1, 0.0))
    dm.setup("fit")
    splits = dm.splits
    dm.setup("test")
    assert dm.splits is splits and dm.source_name == "synthetic"
    assert splits.sizes() == {"train": 160, "val": 20, "calib": 20, "test": 50}
    assert dm.calib_items() == splits.calib
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "last_index", "labels", "uid"}
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 32
    assert batch["input_ids"][torch.arange(16), batch["last_index"]].eq(tokenizer.convert_tokens_to_ids(":")).all()
    first = [next(iter(dm.train_dataloader()))["uid"].tolist() for _ in range(2)]
    assert first[0] == first[1]  # seeded shuffling
    assert sum(len(b["uid"]) for b in dm.test_dataloader()) == 50
    clients = dm.client_items(4, alpha=0.5)
    assert sorted(it.uid for c in clients for it in c) == sorted(it.uid for it in splits.train)


def test_data_module_limit_caps_the_training_articles_stratified() -> None:
    from fedhlm.data import NewsDataModule

    dm = NewsDataModule(source="synthetic", synthetic_size=400, limit=80, holdout=(0.1, 0.1, 0.0))
    dm.setup()
    assert Counter(it.label for it in dm.splits.train) == {0: 20, 1: 20, 2: 20, 3: 20}
    assert dm.splits.sizes()["val"] == 40 and dm.splits.sizes()["test"] == 100  # the limit trims training only


def test_data_info_prints_task_files_and_label_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--source", "synthetic", "--synthetic-size", "40"]) == 0
    out = capsys.readouterr().out
    assert "task: ag_news (4 classes)  source: synthetic" in out
    assert "train file: -  eval file: generated" in out
    assert "3 Sci/Tech       science        train      9  test      2" in out
    assert "splits: train=38, val=1, calib=1, test=10" in out
