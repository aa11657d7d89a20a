"""Shared fixtures: tiny real transformers models (LLaMA and OPT) with a real BPE tokenizer.

The models are real ``LlamaForCausalLM`` / ``OPTForCausalLM`` instances, briefly trained on
real news text (so quantization error shows in perplexity) and saved with ``save_pretrained``,
so they exercise exactly the loading path of hub models (``hf:<dir>``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def _news_text() -> str:
    from suite.data import load_text

    return load_text("abcnews-lee")


def build_tokenizer(vocab_size: int = 512):  # noqa: ANN201
    """A byte-level BPE trained on the news text, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_news_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _train(model: torch.nn.Module, tok, steps: int = 150) -> None:  # noqa: ANN001
    """A few Adam steps on the news text; with the wide init (0.2) the decoder linears carry
    the prediction, so quantization error shows in perplexity (FP ~276, RTN w2 per-channel ~446)."""
    ids = torch.tensor(tok(_news_text())["input_ids"][: 64 * 512]).reshape(-1, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny(family: str, path: Path) -> Path:
    """Save a tiny trained model of ``family`` ('llama' or 'opt') plus tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=True,
                          initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512,
                        word_embed_proj_dim=64, init_std=0.2)
        model = OPTForCausalLM(cfg)
    _train(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# the cache qbench uses outside the tests, as the session starts (qbench_cache redirects
# $QBENCH_CACHE to a temp folder for the rest of the session)
USER_CACHE = Path(os.environ.get("QBENCH_CACHE") or Path.home() / ".cache" / "qbench")


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """The user's qbench cache (``$QBENCH_CACHE`` as the session started, else
    ~/.cache/qbench), where `nox -s reproduce` converts the embedded model. Read only: tests
    write into ``qbench_cache``."""
    return USER_CACHE


@pytest.fixture(scope="session")
def qbench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir for the session (token streams of real corpora are reused across tests)."""
    path = tmp_path_factory.mktemp("qbench-cache")
    os.environ["QBENCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, qbench_cache: Path) -> Path:
    """Directory of a saved tiny LlamaForCausalLM (hidden 64, ffn 128, 2 blocks)."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory, qbench_cache: Path) -> Path:
    """Directory of a saved tiny OPTForCausalLM (hidden 64, ffn 128, 2 blocks)."""
    return build_tiny("opt", tmp_path_factory.mktemp("tiny-opt"))


def write_imagefolder(root: Path, n_train: int = 24, n_val: int = 12, side: int = 28) -> Path:
    """``root/{train,val}/<class>/*.png``: 3 classes of noisy RGB images, class k brighter in
    channel k (learnable in a few steps; saved and decoded as real PNG files)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 160, (side, side, 3), dtype=np.uint8)
                pixels[..., k] += 90
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory, qbench_cache: Path) -> str:
    """A vision dataset id of a 3-class 28x28 ImageFolder fixture (72 train / 36 val)."""
    root = write_imagefolder(tmp_path_factory.mktemp("imagefolder"))
    return f"imagefolder:{root}?crop=28&resize=28"
