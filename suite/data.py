"""Text corpora, cached token streams, fingerprints, evaluation windows, calibration sampling.

Corpus ids (``qbench list datasets``):
  * ``enwiki-gensim``: 106 real English Wikipedia articles shipped in the gensim wheel's test
    data (wiki markup stripped by gensim's ``filter_wiki``); the embedded evaluation text.
  * ``abcnews-lee``: 300 real ABC news articles (gensim's ``lee_background.cor``); the embedded
    calibration text (a different domain, as GPTQ calibrates on C4 and evaluates on WikiText).
  * ``enwiki-heldout`` / ``enwiki-eval``: the same Wikipedia articles split by article (file
    order, redirects dropped: odd positions calibrate, even positions evaluate), so calibration
    can match the evaluation domain without sharing its text; the spans the two sides still
    share (tables transcluded into several articles, markup runs) are cut from the held-out
    side. ``enwiki-eval`` is its own
    perplexity protocol; records of ``enwiki-gensim`` keep theirs.
  * ``austen``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
    (read from R's lazy-load database by ``suite.rdata``, no R needed); one document per
    novel, wrapped lines joined into paragraphs.
  * ``code`` / ``code-eval``: Python source, every module of one pinned PyPI sdist (never
    installed): ``code`` calibrates on boltons 24.1.0, ``code-eval`` evaluates on click 8.1.7
    (a disjoint code base), one document per file in path order.
  * ``hfds:<path>?name=&split=&field=&data_files=&join=nl2|space``: any Hugging Face dataset
    (hub or local directory), the paper-scale path; aliases ``wikitext2``, ``wikitext2-train``,
    ``c4-val``.
  * ``local:<name>``: the UTF-8 text file ``<cache>/corpora/<name>.txt``, documents separated
    by blank lines; needs no package (the GPU check carries its corpora this way).
Documents are joined ("\\n\\n" by default) and tokenized once per (corpus, tokenizer); the token
stream and its fingerprint are cached so later runs need no tokenizer.
"""

from __future__ import annotations

import bz2
import difflib
import hashlib
import json
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from suite.assets import DebPackage, PypiSdist, cache_dir, fetch_deb_files, fetch_sdist
from suite.errors import ConfigError, DataError

DATA_VERSION = 1
ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
ALIASES = {
    "wikitext2": "hfds:wikitext?name=wikitext-2-raw-v1&split=test",
    "wikitext2-train": "hfds:wikitext?name=wikitext-2-raw-v1&split=train",
    "c4-val": "hfds:allenai/c4?data_files=en/c4-validation.00000-of-00008.json.gz&split=train"
              "&join=space",
}
BUILTIN = {
    "enwiki-gensim": "106 real English Wikipedia articles (gensim test data, markup stripped)",
    "abcnews-lee": "300 real ABC news articles (gensim lee_background.cor)",
    "enwiki-heldout": "the odd-position articles of enwiki-gensim, less their 32-character "
                      "spans shared with the even-position ones (calibration side of the split)",
    "enwiki-eval": "the even-position articles of enwiki-gensim (evaluation side of the split)",
    "austen": "Jane Austen's six novels (Debian r-cran-janeaustenr 1.0.0-1)",
    "code": "Python source of boltons 24.1.0 (PyPI sdist, its 30 modules)",
    "code-eval": "Python source of click 8.1.7 (PyPI sdist, its 16 modules)",
}
# Corpora that share text: calibrating on one while evaluating on the other would leak.
SHARES_TEXT = {
    "enwiki-gensim": {"enwiki-heldout", "enwiki-eval"},
    "enwiki-heldout": {"enwiki-gensim"},
    "enwiki-eval": {"enwiki-gensim"},
}
# The calibration corpus drawn from the same domain (but not the same text) as an evaluation
# corpus: the "matched" calibration of the calibration-sensitivity table.
MATCHED = {"enwiki-eval": "enwiki-heldout", "enwiki-gensim": "enwiki-heldout",
           "code-eval": "code"}
AUSTEN_DEB = DebPackage(
    package="r-cran-janeaustenr",
    version="1.0.0-1",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    member_dir="usr/lib/R/site-library/janeaustenr/data",
    files=(("Rdata.rdb", "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"),
           ("Rdata.rdx", "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f")),
)
# (sdist, the directory of the package's modules inside it)
CODE_SDISTS = {
    "code": (PypiSdist("boltons", "24.1.0",
                       "4a49b7d57ee055b83a458c8682a2a6f199d263a8aa517098bda9bab813554b87"),
             "boltons-24.1.0/boltons/"),
    "code-eval": (PypiSdist("click", "8.1.7",
                            "ca9853ad459e787e2192211578cc907e7594e294c7ccc834310722b41b9ca6de"),
                  "click-8.1.7/src/click/"),
}
_JOINERS = {"nl2": "\n\n", "space": " "}
_HFDS_KEYS = ("name", "split", "field", "data_files", "join")
LOCAL_PREFIX = "local:"


def corpus_ids() -> list[str]:
    """Registered corpus ids (built-in corpora and hub aliases)."""
    return [*BUILTIN, *ALIASES]


def describe_corpus(corpus_id: str) -> str:
    """One line for ``qbench list``."""
    return BUILTIN.get(corpus_id) or f"Hugging Face dataset {ALIASES.get(corpus_id, corpus_id)}"


def check_corpus(corpus_id: Any, where: str) -> None:
    """Validate an id's syntax without loading anything (ConfigError naming ``where``)."""
    if isinstance(corpus_id, str) and (corpus_id in BUILTIN or corpus_id in ALIASES):
        return
    if isinstance(corpus_id, str) and corpus_id.startswith("hfds:"):
        _parse_hfds(corpus_id, where)
        return
    if isinstance(corpus_id, str) and corpus_id.startswith(LOCAL_PREFIX):
        name = corpus_id[len(LOCAL_PREFIX):]
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{where}: malformed corpus id {corpus_id!r}; use local:<name> "
                              "for <cache>/corpora/<name>.txt")
        return
    close = difflib.get_close_matches(str(corpus_id), corpus_ids(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}: unknown corpus {corpus_id!r}{hint}; accepted: "
                      f"{', '.join(corpus_ids())}, hfds:<path>?name=&split=&field=, "
                      "local:<name>")


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hfds:`` id."""

    path: str
    name: str | None = None
    split: str = "test"
    field: str = "text"
    data_files: str | None = None
    join: str = "nl2"


def _parse_hfds(corpus_id: str, where: str = "corpus") -> HFSpec:
    path, _, query = corpus_id[5:].partition("?")
    params = dict(parse_qsl(query))
    unknown = set(params) - set(_HFDS_KEYS)
    if not path or unknown:
        raise ConfigError(f"{where}: malformed dataset id {corpus_id!r}; use hfds:<path>?"
                          f"{'&'.join(k + '=' for k in _HFDS_KEYS)}")
    spec = HFSpec(path, **params)
    if spec.join not in _JOINERS:
        raise ConfigError(f"{where}: join={spec.join!r}; accepted: {', '.join(_JOINERS)}")
    return spec


def _gensim_file(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise DataError("corpus needs the PyPI package gensim (pip install gensim)") from e
    path = Path(datapath(name))
    if not path.exists():
        raise DataError(f"gensim test data file {name} is missing; reinstall gensim")
    return path


def _enwiki_documents() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.BZ2File(_gensim_file(ENWIKI_FILE)) as fh:
        pages = [(title, text) for title, text, _ in extract_pages(fh)]
    return [f" = {t} = \n{filter_wiki(x)}" for t, x in pages
            if not x.lower().startswith("#redirect")]


def _enwiki_split(parity: int) -> list[str]:
    """Every other article of enwiki-gensim (0: even positions, 1: odd positions)."""
    return _enwiki_documents()[parity::2]


def _enwiki_heldout() -> list[str]:
    """The odd-position articles, less every span they share with the even-position ones.

    Articles share text (transcluded tables, markup and whitespace runs), so a split by
    article alone leaves 32-token overlaps. Every 32-character span that also occurs on the
    evaluation side is cut out (each maximal cut becomes a paragraph break), until none is
    left: a shared 32-token span would be a shared span of at least 32 characters, so the
    leakage guard passes for any tokenizer. This removes under 1% of the text.
    """
    held, ev = _enwiki_split(1), _enwiki_split(0)
    reference = _sorted_hashes(_codepoints("\x00".join(ev)), SHARED_SPAN)
    for _ in range(5):
        held, cut = zip(*(_cut_shared(d, reference, SHARED_SPAN) for d in held), strict=True)
        if not any(cut):
            return list(held)
    raise DataError("enwiki-heldout: shared spans remain after 5 passes")


SHARED_SPAN = 32  # characters


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _sorted_hashes(cp: np.ndarray, n: int) -> np.ndarray:
    return np.unique(_ngram_hashes(cp, n))


def _cut_shared(doc: str, reference: np.ndarray, n: int) -> tuple[str, bool]:
    """``doc`` with every ``n``-character span whose hash is in ``reference`` replaced (runs
    merged) by a paragraph break, and whether anything was cut. A hash collision only cuts a
    little more text."""
    hashes = _ngram_hashes(_codepoints(doc), n)
    pos = np.searchsorted(reference, hashes)
    hit = (pos < len(reference)) & (reference[np.minimum(pos, len(reference) - 1)] == hashes)
    if not hit.any():
        return doc, False
    mask = np.zeros(len(doc) + 2, dtype=np.int8)  # doc position i at i + 1, padded
    for i in np.flatnonzero(hit):
        mask[i + 1:i + 1 + n] = 1
    step = np.diff(mask)
    starts, ends = np.flatnonzero(step == 1), np.flatnonzero(step == -1)  # cut [start, end)
    parts = [doc[a:b] for a, b in zip(np.r_[0, ends], np.r_[starts, len(doc)], strict=True)]
    return "\n\n".join(p for p in parts if p), True


def _austen_documents() -> list[str]:
    from suite.rdata import read_lazyload

    novels = read_lazyload(fetch_deb_files(AUSTEN_DEB, cache_dir() / "datasets" / "austen"))
    return [_paragraphs(novels[name].values) for name in sorted(novels)]


def _paragraphs(lines: list[str | None]) -> str:
    """Hard-wrapped lines -> paragraphs (lines joined by spaces, blank lines separating)."""
    paras, current = [], []
    for line in (x.strip() if x else "" for x in lines):
        if line:
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    return "\n\n".join(paras + ([" ".join(current)] if current else []))


def _code_documents(corpus_id: str) -> list[str]:
    sdist, prefix = CODE_SDISTS[corpus_id]
    with tarfile.open(fetch_sdist(sdist)) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.startswith(prefix)
                          and m.name.endswith(".py")), key=lambda m: m.name)
        texts = [tf.extractfile(m).read().decode("utf-8") for m in members]  # type: ignore[union-attr]
    return [t for t in texts if t.strip()]


def _lee_documents() -> list[str]:
    lines = _gensim_file(LEE_FILE).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def local_corpus_path(name: str) -> Path:
    """Where the text of ``local:<name>`` lives."""
    return cache_dir() / "corpora" / f"{name}.txt"


def _local_documents(name: str) -> list[str]:
    path = local_corpus_path(name)
    if not path.is_file():
        raise DataError(f"corpus local:{name}: no file {path}")
    docs = path.read_text(encoding="utf-8").split("\n\n")
    return [d.strip() for d in docs if d.strip()]


def _hf_documents(spec: HFSpec, corpus_id: str) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split,
                                   data_files=spec.data_files)
    except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types offline
        raise DataError(f"cannot load dataset {corpus_id!r}: it needs Hugging Face hub access "
                        f"or a local copy ({type(e).__name__})") from e
    if spec.field not in ds.column_names:
        raise DataError(f"dataset {corpus_id!r} has no field {spec.field!r}; fields: "
                        f"{', '.join(ds.column_names)}")
    return list(ds[spec.field])


_LOADERS = {
    "enwiki-gensim": _enwiki_documents,
    "abcnews-lee": _lee_documents,
    "enwiki-heldout": _enwiki_heldout,
    "enwiki-eval": lambda: _enwiki_split(0),
    "austen": _austen_documents,
    "code": lambda: _code_documents("code"),
    "code-eval": lambda: _code_documents("code-eval"),
}


def matched_calib(protocol_id: str) -> str | None:
    """The calibration corpus matching a perplexity protocol's evaluation domain, if any."""
    parts = protocol_id.split("/")
    return MATCHED.get(parts[1]) if parts[0] == "ppl" and len(parts) > 1 else None


def shares_text(a: str, b: str) -> bool:
    """Whether two corpus ids name overlapping text (the same corpus, or a split of it)."""
    return a == b or b in SHARES_TEXT.get(a, ())


@lru_cache(maxsize=8)
def load_documents(corpus_id: str) -> tuple[str, ...]:
    """The raw documents of a corpus."""
    check_corpus(corpus_id, "corpus")
    corpus_id = ALIASES.get(corpus_id, corpus_id)
    if corpus_id in _LOADERS:
        return tuple(_LOADERS[corpus_id]())
    if corpus_id.startswith(LOCAL_PREFIX):
        return tuple(_local_documents(corpus_id[len(LOCAL_PREFIX):]))
    return tuple(_hf_documents(_parse_hfds(corpus_id), corpus_id))


def joiner(corpus_id: str) -> str:
    """The separator documents are joined with (GPTQ: "\\n\\n" for WikiText, " " for C4)."""
    cid = ALIASES.get(corpus_id, corpus_id)
    return _JOINERS[_parse_hfds(cid).join] if cid.startswith("hfds:") else "\n\n"


def load_text(corpus_id: str) -> str:
    """The corpus as one string (documents joined)."""
    return joiner(corpus_id).join(load_documents(corpus_id))


def source_fingerprint(corpus_id: str) -> str:
    """Fingerprint of the corpus text (and of the data code version)."""
    h = hashlib.sha256(f"{corpus_id}:v{DATA_VERSION}:".encode())
    h.update(load_text(corpus_id).encode("utf-8"))
    return h.hexdigest()[:16]


def fingerprint_tokens(ids: torch.Tensor) -> str:
    """sha256 of the token ids as int32 little-endian bytes (first 16 hex chars)."""
    arr = np.ascontiguousarray(ids.reshape(-1).numpy().astype("<i4"))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


# A built-in corpus whose text changed after its token streams may have been cached: its
# revision enters the cache name (not the source fingerprint, which hashes the text itself).
REVISIONS = {"enwiki-heldout": 1}  # 1: shared spans cut


def _cache_stem(corpus_id: str, tokenizer_key: str) -> Path:
    rev = f"|r{REVISIONS[corpus_id]}" if corpus_id in REVISIONS else ""
    name = hashlib.sha256(f"{corpus_id}|{tokenizer_key}|v{DATA_VERSION}{rev}".encode()
                          ).hexdigest()
    return cache_dir() / "tokens" / name[:24]


def cached_stream_info(corpus_id: str, tokenizer_key: str) -> dict[str, Any] | None:
    """The cached fingerprint record of a token stream, or None when not yet tokenized."""
    stem = _cache_stem(corpus_id, tokenizer_key)
    meta, tensor = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if not (meta.exists() and tensor.exists()):
        return None
    return json.loads(meta.read_text())


def stream_info(corpus_id: str, tokenizer: Any, tokenizer_key: str) -> dict[str, Any]:
    """Tokenize (once) and return {"corpus", "source_fp", "tokens_fp", "n_tokens"}."""
    cached = cached_stream_info(corpus_id, tokenizer_key)
    if cached is not None:
        return cached
    ids = _tokenize(load_text(corpus_id), tokenizer)
    info = {"corpus": corpus_id, "source_fp": source_fingerprint(corpus_id),
            "tokens_fp": fingerprint_tokens(ids), "n_tokens": int(ids.numel())}
    stem = _cache_stem(corpus_id, tokenizer_key)
    atomic_save(stem.with_suffix(".pt"), lambda p: torch.save(ids, p))
    atomic_save(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(info)))
    return info


def token_stream(corpus_id: str, tokenizer: Any, tokenizer_key: str) -> torch.Tensor:
    """The corpus as a 1-D int64 token tensor; from the cache when available."""
    if cached_stream_info(corpus_id, tokenizer_key) is None:
        if tokenizer is None:
            raise DataError(f"token stream of {corpus_id!r} is not prepared; run `qbench run`")
        stream_info(corpus_id, tokenizer, tokenizer_key)
    return torch.load(_cache_stem(corpus_id, tokenizer_key).with_suffix(".pt"))


def _tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def atomic_save(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(tmp_path)`` and an atomic rename (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def eval_windows(ids: torch.Tensor, seqlen: int, n_windows: int | None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows (remainder dropped), (n, seqlen).

    With ``n_windows`` smaller than the number available, that many windows are taken spread
    evenly over the stream (indices round(linspace(0, n_total - 1, n))), so the sample covers
    the whole corpus rather than its first documents.
    """
    n_total = ids.numel() // seqlen
    if n_total < 1:
        raise DataError(f"evaluation stream has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    all_windows = ids[: n_total * seqlen].reshape(n_total, seqlen)  # (n_total, seqlen)
    if n_windows is None or n_windows >= n_total:
        return all_windows
    idx = np.round(np.linspace(0, n_total - 1, n_windows)).astype(np.int64)
    return all_windows[torch.from_numpy(idx)]


def with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """``windows`` (n, seqlen) with BOS in front, (n, seqlen + 1); unchanged without a BOS id.
    The targets a window is scored on stay its own tokens."""
    if bos_id is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos_id, dtype=windows.dtype), windows], 1)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's sampler: ``n`` windows at uniform random offsets of a joined stream, (n, seqlen)."""
    if ids.numel() <= seqlen:
        raise DataError(f"calibration stream has {ids.numel()} tokens; needs more than {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[i : i + seqlen] for i in starts])


def _ngram_hashes(ids: np.ndarray, ngram: int) -> np.ndarray:
    """Polynomial hash of every ``ngram``-token span (uint64, wrapping arithmetic)."""
    n = len(ids) - ngram + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    base = np.uint64(1_000_003)
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        for k in range(ngram):
            h = h * base + x[k : k + n]
    return h


def leakage_check(calib: torch.Tensor, eval_ids: torch.Tensor, ngram: int = 32) -> int:
    """Number of calibration windows sharing any ``ngram``-token span with the eval stream.

    Spans are matched by a 64-bit rolling hash and every hash hit is confirmed token by token.
    """
    ev = eval_ids.reshape(-1).numpy()
    ev_hash = _ngram_hashes(ev, ngram)
    order = np.argsort(ev_hash, kind="stable")
    sorted_hash = ev_hash[order]
    return sum(_window_leaks(w, ev, order, sorted_hash, ngram) for w in calib.numpy())


def _window_leaks(window: np.ndarray, ev: np.ndarray, order: np.ndarray,
                  sorted_hash: np.ndarray, ngram: int) -> bool:
    hashes = _ngram_hashes(window, ngram)
    first = np.searchsorted(sorted_hash, hashes)  # leftmost position of each hash
    for j, p in enumerate(first):
        while p < len(sorted_hash) and sorted_hash[p] == hashes[j]:
            start = order[p]
            if np.array_equal(ev[start : start + ngram], window[j : j + ngram]):
                return True
            p += 1
    return False
