"""The GPU check's tiny LLM: template (tokenizer, config, corpora), seeded weights, grids.

The template (config.json, tokenizer files) and the two local corpora are made once on the CPU
machine and carried. The weights (about 200 MB at full size, too large to carry) are written on
each machine from ``numpy.random.RandomState`` streams, whose values are frozen across numpy
versions, straight into a hand-written safetensors file, so the model directory is
byte-identical on both machines: the same ``dir_fingerprint``, the same run keys, and the
carried token streams are found without a tokenizer on the GPU machine.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIB, EVAL = "gpucheck-calib", "gpucheck-eval"  # local:<name> corpora
TEMPLATE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TinySpec:
    """Shape of the generated model and of its grid (full: the GPU check; small: CI)."""

    hidden: int = 1024
    ffn: int = 2816
    blocks: int = 4
    heads: int = 8
    vocab: int = 512
    group: int = 128
    seqlen: int = 128
    calib_windows: int = 16
    eval_windows: int = 32
    corpus_chars: int = 60_000

    def config(self) -> dict:
        """The transformers LlamaConfig as a plain dict (written as config.json)."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": self.hidden, "intermediate_size": self.ffn,
                "num_hidden_layers": self.blocks, "num_attention_heads": self.heads,
                "num_key_value_heads": self.heads, "vocab_size": self.vocab,
                "max_position_embeddings": 4 * self.seqlen, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                "attention_bias": False, "mlp_bias": False, "bos_token_id": 0,
                "eos_token_id": 1, "torch_dtype": "float32"}


FULL = TinySpec()
SMALL = TinySpec(hidden=128, ffn=256, blocks=2, heads=4, group=64, eval_windows=16,
                 calib_windows=8, seqlen=64, corpus_chars=30_000)


def write_corpora(spec: TinySpec, cache: Path) -> None:
    """``local:gpucheck-calib`` (ABC news) and ``local:gpucheck-eval`` (Wikipedia): the first
    ``corpus_chars`` of each built-in corpus, whole documents, blank-line separated."""
    from suite.data import load_documents

    for name, source in ((CALIB, "abcnews-lee"), (EVAL, "enwiki-gensim")):
        docs, size = [], 0
        for d in load_documents(source):
            docs.append(d.replace("\n\n", "\n").strip())
            size += len(d)
            if size >= spec.corpus_chars:
                break
        path = cache / "corpora" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def write_template(spec: TinySpec, cache: Path, template: Path) -> None:
    """config.json and a byte-level BPE (``spec.vocab`` tokens) trained on both corpora."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [(cache / "corpora" / f"{n}.txt").read_text(encoding="utf-8") for n in (CALIB, EVAL)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    template.mkdir(parents=True, exist_ok=True)
    tok.save(str(template / "tokenizer.json"))
    (template / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "model_max_length": 4 * spec.seqlen}, indent=1, sort_keys=True) + "\n")
    cfg = {**spec.config(), "vocab_size": tok.get_vocab_size()}
    (template / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the LLaMA checkpoint, by its transformers name."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d),
                                          "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        block = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d),
                 "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
                 "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
                 "input_layernorm": (d,), "post_attention_layernorm": (d,)}
        shapes.update({f"model.layers.{i}.{name}.weight": s for name, s in block.items()})
    return shapes


def seeded_tensor(name: str, shape: tuple[int, ...], index: int, seed: int = 0) -> np.ndarray:
    """float32 values of one tensor: norms 1; embeddings N(0, 1); linears N(0, 1/fan_in)
    (lm_head 3x that, so the logits are peaked enough for quantization to show)."""
    if len(shape) == 1:
        return np.ones(shape, dtype="<f4")
    if "embed_tokens" in name:
        std = 1.0
    else:
        std = (3.0 if name == "lm_head.weight" else 1.0) / float(np.sqrt(shape[1]))
    values = np.random.RandomState(seed * 100_003 + index).standard_normal(shape) * std
    return values.astype("<f4")


def write_safetensors(path: Path, cfg: dict) -> None:
    """The checkpoint as one safetensors file, written by hand (stable bytes: sorted names,
    fixed metadata), one tensor at a time."""
    shapes = weight_shapes(cfg)
    names = sorted(shapes)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        n = 4 * int(np.prod(shapes[name]))
        header[name] = {"dtype": "F32", "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for i, name in enumerate(names):
            fh.write(seeded_tensor(name, shapes[name], i).tobytes())


def materialise(template: Path, out: Path) -> Path:
    """The model directory ``out``: the template's files plus the seeded weights (skipped
    when ``out`` already holds them)."""
    weights = out / "model.safetensors"
    if weights.exists() and all((out / f).exists() for f in TEMPLATE_FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in TEMPLATE_FILES:
        shutil.copyfile(template / f, out / f)
    cfg = json.loads((template / "config.json").read_text())
    tmp = out / "model.safetensors.tmp"
    write_safetensors(tmp, cfg)
    tmp.replace(weights)
    return out


def lm_grid(spec: TinySpec, model_dir: str, store: str) -> dict:
    """The LM grid: FP, RTN, GPTQ, decoupleQ, pre-calibration and the chain at W4 and W3."""
    return {
        "name": "gpucheck-lm",
        "description": f"GPU check: seeded LLaMA-architecture model (d={spec.hidden}, "
                       f"{spec.blocks} blocks), local corpora, every PTQ path",
        "axes": {"model": [f"hf:{model_dir}"],
                 "method": ["fp", "rtn", "gptq", "decoupleq", "precalibration",
                            "precalibration+gptq"],
                 "wbits": [4, 3], "group_size": [spec.group], "seed": [0]},
        "fixed": {"calib": {"corpus": f"local:{CALIB}", "windows": spec.calib_windows,
                            "seqlen": spec.seqlen},
                  "eval": [{"type": "ppl", "corpus": f"local:{EVAL}", "seqlen": spec.seqlen,
                            "windows": spec.eval_windows}]},
        "run": {"store": store, "device": "cpu", "timeout_s": 900},
    }


def vision_grid(store: str, steps: int = 50) -> dict:
    """The vision QAT cells: LSQ and TR scheduling, W4A4 per-tensor, ``steps`` steps, from the
    published vision grid's FP checkpoint (the same recipe, so the same cached file)."""
    return {
        "name": "gpucheck-vision",
        "description": f"GPU check: cnn-small on Fashion-MNIST, LSQ and TR scheduling, "
                       f"{steps} steps",
        "axes": {"model": ["cnn-small@fashion-mnist"], "method": ["lsq", "tr_scheduling"],
                 "wbits": [4], "group_size": ["per-tensor"], "sym": [True], "seed": [0]},
        "fixed": {"vision": {"fp_train": {"epochs": 2, "optimizer": "adam", "lr": 0.001,
                                          "batch_size": 128},
                             "fp_seed": 0,
                             "train": {"epochs": 1, "max_steps": steps, "batch_size": 128}},
                  "eval": [{"type": "top1", "dataset": "fashion-mnist", "split": "test"}]},
        "methods": {"tr_scheduling": {"U0": 0.01, "first_last_bits": 8}},
        "run": {"store": store, "device": "cpu", "timeout_s": 900},
    }
