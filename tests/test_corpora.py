"""Corpora, token caches, windows, calibration sampling, leakage guard, hub-dataset path."""

from __future__ import annotations

import pytest
import torch

from suite import data
from suite.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    from conftest import build_tokenizer

    return build_tokenizer()


def test_gensim_corpora_are_real_and_disjoint():
    wiki = data.load_documents("enwiki-gensim")
    news = data.load_documents("abcnews-lee")
    assert len(wiki) == 106 and wiki[0].startswith(" = Anarchism = ")
    assert len(news) == 300
    assert 3_000_000 < sum(map(len, wiki)) < 3_200_000
    assert not set(news) & set(wiki)


def test_token_stream_cached_and_fingerprinted(tok, qbench_cache):
    info = data.stream_info("abcnews-lee", tok, "tiny-tok")
    assert info["n_tokens"] > 50_000 and len(info["tokens_fp"]) == 16
    assert data.cached_stream_info("abcnews-lee", "tiny-tok") == info

    class Boom:
        def __call__(self, *a, **k):  # noqa: ANN002, ANN003, ANN204
            raise AssertionError("tokenizer called on a cache hit")

    ids = data.token_stream("abcnews-lee", Boom(), "tiny-tok")
    assert data.fingerprint_tokens(ids) == info["tokens_fp"]
    with pytest.raises(DataError, match="not prepared"):
        data.token_stream("abcnews-lee", None, "other-tokenizer")


def test_fingerprints_are_sensitive():
    a = torch.arange(100)
    b = a.clone()
    b[50] = 7
    assert data.fingerprint_tokens(a) == data.fingerprint_tokens(a.clone())
    assert data.fingerprint_tokens(a) != data.fingerprint_tokens(b)


def test_eval_windows_all_and_spread():
    ids = torch.arange(10 * 4 + 3)  # 10 full windows of 4, remainder 3 dropped
    all_w = data.eval_windows(ids, 4, None)
    assert all_w.shape == (10, 4) and all_w[-1].tolist() == [36, 37, 38, 39]
    assert torch.equal(data.eval_windows(ids, 4, 50), all_w)
    spread = data.eval_windows(ids, 4, 4)  # indices round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert spread[:, 0].tolist() == [0, 12, 24, 36]
    with pytest.raises(DataError):
        data.eval_windows(torch.arange(3), 4, None)


def test_calibration_windows_gptq_sampler():
    import random

    ids = torch.arange(1000)
    w = data.calibration_windows(ids, 5, 16, seed=3)
    rng = random.Random(3)
    starts = [rng.randint(0, 1000 - 16 - 1) for _ in range(5)]
    assert w[:, 0].tolist() == starts
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(5, 15, dtype=torch.int64))
    assert torch.equal(w, data.calibration_windows(ids, 5, 16, seed=3))
    assert not torch.equal(w, data.calibration_windows(ids, 5, 16, seed=4))
    # the reference sampler needs len > seqlen: seqlen + 1 tokens is the smallest valid stream
    assert data.calibration_windows(torch.arange(17), 2, 16, seed=0).shape == (2, 16)
    with pytest.raises(DataError, match="needs more than 16"):
        data.calibration_windows(torch.arange(16), 2, 16, seed=0)


def test_no_calibration_window_occurs_in_the_evaluation_text(tok, qbench_cache):
    data.stream_info("enwiki-gensim", tok, "tiny-tok")
    data.stream_info("abcnews-lee", tok, "tiny-tok")
    ev = data.token_stream("enwiki-gensim", None, "tiny-tok")
    news = data.token_stream("abcnews-lee", None, "tiny-tok")
    calib = data.calibration_windows(news, 128, 512, seed=1)
    assert data.leakage_check(calib, ev) == 0
    planted = torch.cat([calib[:3], ev[5000:5512].unsqueeze(0)])
    assert data.leakage_check(planted, ev) == 1


def test_unknown_and_malformed_corpus_ids():
    with pytest.raises(ConfigError, match="did you mean 'wikitext2'"):
        data.check_corpus("wikitxt2", "fixed.eval[0].corpus")
    with pytest.raises(ConfigError, match="malformed dataset id"):
        data.check_corpus("hfds:x?colour=red", "fixed.eval[0].corpus")


def test_hub_dataset_path_on_a_local_fixture(tmp_path, tok, qbench_cache):
    import datasets

    rows = {"text": ["First article about anarchism.", "", "Second article about Alabama."]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "test.parquet"))
    cid = f"hfds:parquet?data_files={tmp_path / 'test.parquet'}&split=train"
    data.check_corpus(cid, "x")
    want = "First article about anarchism.\n\n\n\nSecond article about Alabama."
    assert data.load_text(cid) == want
    info = data.stream_info(cid, tok, "tiny-tok")
    assert info["n_tokens"] > 5


def test_hub_dataset_unreachable_is_one_line_data_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data.load_documents.cache_clear()
    with pytest.raises(DataError, match="needs Hugging Face hub access or a local copy"):
        data.load_documents("wikitext2")
