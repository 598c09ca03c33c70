import json

import pytest

from compress.data import default_corpus, load_texts, sample_texts, token_stream_batches
from compress.errors import CompressError


def test_default_corpus_is_english_prose():
    texts = default_corpus()
    assert len(texts) > 200
    assert all(len(t) > 200 for t in texts)
    assert sum(" the " in t for t in texts) > 0.9 * len(texts)


def test_txt_jsonl_and_endoftext(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert load_texts(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "b.txt").write_text("story one\nline<|endoftext|>story two")
    assert load_texts(tmp_path / "b.txt") == ["story one\nline", "story two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert load_texts(tmp_path / "c.jsonl") == ["x", "y"]


def test_bad_data(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("   \n\n")
    with pytest.raises(CompressError, match="holds no text"):
        load_texts(tmp_path / "e.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(CompressError, match="line 1: no \"text\" field"):
        load_texts(tmp_path / "bad.jsonl")


def test_sampling_is_seeded():
    t = [str(i) for i in range(100)]
    assert sample_texts(t, 10, seed=1) == sample_texts(t, 10, seed=1)
    assert sample_texts(t, 10, seed=1) != sample_texts(t, 10, seed=2)


def test_token_windows(bert_tokenizer):
    ids = token_stream_batches(bert_tokenizer, default_corpus(), 64, 5)
    assert ids.shape == (5, 64)
    with pytest.raises(CompressError, match="fewer than one sequence of 4096"):
        token_stream_batches(bert_tokenizer, ["short"], 4096, 1)
