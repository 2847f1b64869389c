"""The embedded corpus, its loading through datasets, the byte tokenizer and batching."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from moe_utils import data as D

SMALL = 12_000  # characters per domain: enough for every test here, fast to build


@pytest.fixture(scope="module")
def records():
    return D.corpus_records(chars_per_domain=SMALL)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_corpus_has_three_balanced_domains(records):
    chars = Counter()
    for r in records:
        assert set(r) == {"domain", "text"} and r["text"].strip()
        chars[r["domain"]] += len(r["text"])
    assert tuple(sorted(chars)) == tuple(sorted(D.DOMAINS))
    for dom, n in chars.items():
        # each domain reaches its budget and overshoots by at most one chunk
        assert SMALL <= n < SMALL + D.CHUNK_CHARS, (dom, n)


def test_corpus_domains_hold_what_they_claim(records):
    by = {d: "\n".join(r["text"] for r in records if r["domain"] == d) for d in D.DOMAINS}
    assert "def " in by["code"] and "import" in by["code"]
    assert " the " in by["prose"]
    line = by["math"].splitlines()[0]
    a, op, b, eq, c = line.split()
    assert eq == "=" and int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_tokenizer_round_trips_every_domain(records):
    tok = D.ByteTokenizer()
    seen = set()
    for r in records:
        ids = tok.encode(r["text"])
        assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
        assert tok.decode(ids) == r["text"]
        seen.add(r["domain"])
    assert seen == set(D.DOMAINS)
    text = "naïve café → ∑ 😀"
    assert len(tok.encode(text)) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(tok.encode(text).tolist()) == text


def test_tokenizer_rejects_bad_input():
    tok = D.ByteTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode([65, 256])
    with pytest.raises(TypeError, match="ids"):
        tok.decode(torch.zeros(3))


def test_corpus_builder_is_deterministic_same_bytes_twice(tmp_path):
    a = D.build_corpus(tmp_path / "a.jsonl", chars_per_domain=SMALL)
    b = D.build_corpus(tmp_path / "b.jsonl", chars_per_domain=SMALL)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert rows == D.corpus_records(chars_per_domain=SMALL)
    assert not list(tmp_path.glob("*.tmp*")), "the atomic write left a temporary file behind"


def test_corpus_builder_seed_changes_only_math(tmp_path):
    r0 = D.corpus_records(chars_per_domain=SMALL, seed=0)
    r1 = D.corpus_records(chars_per_domain=SMALL, seed=1)
    for dom in ("code", "prose"):
        assert [r for r in r0 if r["domain"] == dom] == [r for r in r1 if r["domain"] == dom]
    assert [r for r in r0 if r["domain"] == "math"] != [r for r in r1 if r["domain"] == "math"]


def test_default_corpus_goes_to_the_cache_folder_not_the_repo(cache):
    path = D.default_corpus_path()
    assert path.parent == cache and path.name.startswith("corpus-v")


def test_load_corpus_splits_every_domain_deterministically(tmp_path, cache):
    src = D.build_corpus(tmp_path / "small.jsonl", chars_per_domain=SMALL)
    dd = D.load_corpus(src)
    assert set(dd) == {"train", "validation"}
    for split in ("train", "validation"):
        assert dd[split].column_names == ["domain", "text"]
        assert set(dd[split]["domain"]) == set(D.DOMAINS)
    assert len(dd["train"]) + len(dd["validation"]) == len(D.corpus_records(chars_per_domain=SMALL))
    assert not set(dd["train"]["text"]) & set(dd["validation"]["text"])
    again = D.load_corpus(src)
    assert again["validation"]["text"] == dd["validation"]["text"]
    other = D.load_corpus(src, split_seed=1)
    assert other["validation"]["text"] != dd["validation"]["text"]


def test_load_corpus_default_builds_the_embedded_corpus_offline(cache, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = datasets.config.HF_HUB_OFFLINE
    dd = D.load_corpus()
    assert D.default_corpus_path().exists()
    assert set(dd["validation"]["domain"]) == set(D.DOMAINS)
    # hub access was switched off for the local load only, then restored
    assert datasets.config.HF_HUB_OFFLINE == before
    import os

    assert "HF_HUB_OFFLINE" not in os.environ


def test_load_corpus_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_corpus(str(tmp_path / "nope.jsonl"))


def test_load_corpus_empty_or_unreadable_path_raises(tmp_path, cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        D.load_corpus(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("this is not json\n")
    with pytest.raises(ValueError, match="could not read"):
        D.load_corpus(broken)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="text_field"):
        D.load_corpus(no_text)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        D.load_corpus(folder)


def test_load_corpus_rejects_bad_arguments():
    with pytest.raises(TypeError, match="source"):
        D.load_corpus(42)
    with pytest.raises(ValueError, match="validation_fraction"):
        D.load_corpus(validation_fraction=1.5)


def test_hub_names_and_paths_are_told_apart():
    assert not D._looks_local("roneneldan/TinyStories")
    assert D._looks_local("my_corpus.jsonl")
    assert D._looks_local("./data")


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    x, y = D.get_batch(data, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = D.get_batch(data, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    # the last window may end on the last token, never past it
    xs, ys = D.get_batch(torch.arange(11), 8, 10, torch.Generator().manual_seed(0))
    assert torch.equal(xs[0], torch.arange(10)) and torch.equal(ys[0], torch.arange(1, 11))


def test_get_batch_sequence_longer_than_data_raises():
    with pytest.raises(ValueError, match="seq_len=64 needs at least"):
        D.get_batch(torch.arange(50), 2, 64)
    with pytest.raises(ValueError, match="batch_size"):
        D.get_batch(torch.arange(50), 0, 8)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        D.get_batch(torch.rand(50), 2, 8)


def test_encode_split_by_domain(tmp_path, cache):
    dd = D.load_corpus(D.build_corpus(tmp_path / "c.jsonl", chars_per_domain=SMALL))
    whole = D.encode_split(dd["validation"])
    parts = [D.encode_split(dd["validation"], d) for d in D.DOMAINS]
    assert sum(p.numel() for p in parts) < whole.numel()  # the whole adds separators
    with pytest.raises(ValueError, match="domain must be one of"):
        D.encode_split(dd["validation"], "poetry")
