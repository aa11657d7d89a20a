"""GGUF export of a quantized LLaMA-architecture model, for llama.cpp and transformers.

Each quantized layer (a ``LayerQState``) is written as GGML blocks of 32 weights encoded from
its integer codes, never requantized. A block holds a float16 scale ``d`` and, for the
asymmetric types, a float16 offset ``m`` (ggml's ``block_q4_0`` ... ``block_q8_0``; byte layouts
as the ``gguf`` package's ``quants.py`` reads them, checked against its ``dequantize`` in tests)::

    type  qbench format                  weight             bytes per block
    Q4_0  4-bit symmetric (zero 8)       d * (q - 8)        d | qs[16]
    Q4_1  4-bit asymmetric               d * q + m          d | m | qs[16]
    Q5_0  5-bit symmetric (zero 16)      d * (q - 16)       d | qh[4] | qs[16]
    Q5_1  5-bit asymmetric               d * q + m          d | m | qh[4] | qs[16]
    Q8_0  8-bit symmetric (zero 128)     d * (q - 128)      d | int8[32]

``qs`` holds weight j in the low nibble of byte j and weight j + 16 in its high nibble; ``qh``
is a little-endian uint32 whose bit j is bit 4 of weight j. With qbench's codes u and
parameters: d = scale; integer zero points give m = float16(-scale * zero); decoupleQ's float
offsets (x = s (u + alpha) + z) give m = float16(s * alpha + z). The float16 rounding of ``m``
is the only difference between the file and qbench's fake-quant model; d is exact (scales are
stored in float16 already, and checked). A group of g = 32 k columns becomes k blocks with the
group's constants; per-channel and per-tensor likewise. Every other format is refused with one
line (``ExportRefused``) before anything is written.

LLaMA's Q and K projections are stored with the rows of each head interleaved (llama.cpp's
rotary layout) instead of transformers' rotate-half layout: the same row permutation as
``convert_hf_to_gguf.py``'s ``LlamaModel.permute``, applied to the codes and block constants
(a row permutation keeps every block whole). transformers' GGUF loader undoes it.

Tokenizer keys (``tokenizer.*``) are copied verbatim from a template GGUF (the file the model
came from), or built from a byte-level BPE ``tokenizer.json``. Provenance is written under
``qbench.*``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    TokenType,
    get_tensor_name_map,
)
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION

from suite.errors import DataError, ExportRefused
from suite.primitives import PER_CHANNEL, PER_TENSOR, LayerQState, WeightFormat, signed_grid

QK = 32  # weights per block of every type written here
_FIELD_BYTES = {"d": 2, "m": 2, "qh": 4, "qs4": 16, "qs8": 32}
EXPORTABLE = ("exportable: 4-bit (Q4_0 symmetric / Q4_1 asymmetric), 5-bit (Q5_0 / Q5_1), "
              "8-bit symmetric (Q8_0), with group sizes a multiple of 32, per-channel or "
              "per-tensor")


# --- block types ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockType:
    """A GGML block type that represents a qbench format exactly (up to float16 ``m``).

    Attributes:
        qtype: the GGML type.
        bits: code width b.
        offset: True for d * q + m (asymmetric), False for d * (q - 2^(b-1)) (symmetric).
        layout: the block's fields in byte order (sizes in ``_FIELD_BYTES``).
    """

    qtype: GGMLQuantizationType
    bits: int
    offset: bool
    layout: tuple[str, ...]

    @property
    def name(self) -> str:
        """The GGML type name, e.g. ``Q4_1``."""
        return self.qtype.name

    @property
    def centre(self) -> int:
        """The symmetric types' fixed zero point 2^(b-1)."""
        return 2 ** (self.bits - 1)


BLOCK_TYPES: dict[str, BlockType] = {
    b.name: b
    for b in (
        BlockType(GGMLQuantizationType.Q4_0, 4, False, ("d", "qs4")),
        BlockType(GGMLQuantizationType.Q4_1, 4, True, ("d", "m", "qs4")),
        BlockType(GGMLQuantizationType.Q5_0, 5, False, ("d", "qh", "qs4")),
        BlockType(GGMLQuantizationType.Q5_1, 5, True, ("d", "m", "qh", "qs4")),
        BlockType(GGMLQuantizationType.Q8_0, 8, False, ("d", "qs8")),
    )
}


def block_type_for(bits: int, asymmetric: bool) -> BlockType | None:
    """The block type of b-bit codes with (True) or without an offset; None if GGUF has none."""
    for block in BLOCK_TYPES.values():
        if block.bits == bits and block.offset == asymmetric:
            return block
    return None


def _nibbles(q: np.ndarray, block: BlockType) -> np.ndarray:
    """qs: byte j holds bits 0-3 of weight j (low nibble) and of weight j + 16 (high)."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)  # (n, 16)


def _high_bits(q: np.ndarray, block: BlockType) -> np.ndarray:
    """qh: a little-endian uint32 whose bit j is bit 4 of weight j."""
    bits = ((q >> 4) & 1) << np.arange(QK, dtype=np.uint32)  # (n, 32), disjoint bits
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _int8(q: np.ndarray, block: BlockType) -> np.ndarray:
    """Q8_0's signed weights q - 128 as bytes."""
    return (q.astype(np.int16) - block.centre).astype(np.int8).view(np.uint8)  # (n, 32)


_CODE_FIELDS = {"qs4": _nibbles, "qh": _high_bits, "qs8": _int8}


def encode_blocks(qtype: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None
                  ) -> np.ndarray:
    """Encode blocks of 32 unsigned codes with their constants as GGML bytes.

    Args:
        qtype: a key of ``BLOCK_TYPES``.
        codes: integer codes (n, 32) in [0, 2^b - 1] (qbench's unsigned convention).
        d: float16 scales (n,).
        m: float16 offsets (n,), for the asymmetric types only.

    Returns:
        uint8 (n, block bytes), the fields in the order of ``BlockType.layout``.
    """
    block = BLOCK_TYPES[qtype]
    q = codes.astype(np.uint32)  # (n, 32)
    constants = {"d": d, "m": m}
    parts = []
    for field in block.layout:
        if field in constants:
            value = constants[field]
            assert value is not None, f"{qtype} needs {field}"
            parts.append(value.astype("<f2").view(np.uint8).reshape(-1, 2))
        else:
            parts.append(_CODE_FIELDS[field](q, block))
    return np.concatenate(parts, axis=1)


def decode_blocks(qtype: str, raw: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of ``encode_blocks``: uint8 (n, block bytes) -> (codes (n, 32) uint8,
    d (n,) float32, m (n,) float32 or None)."""
    block = BLOCK_TYPES[qtype]
    cuts = np.cumsum([_FIELD_BYTES[f] for f in block.layout])[:-1]
    fields = dict(zip(block.layout, np.split(raw, cuts, axis=1), strict=True))
    d = np.ascontiguousarray(fields["d"]).view("<f2").reshape(-1).astype(np.float32)
    m = None
    if block.offset:
        m = np.ascontiguousarray(fields["m"]).view("<f2").reshape(-1).astype(np.float32)
    if "qs8" in fields:
        codes = fields["qs8"].view(np.int8).astype(np.int16) + block.centre
        return codes.astype(np.uint8), d, m
    qs = fields["qs4"]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # (n, 32)
    if "qh" in fields:
        qh = np.ascontiguousarray(fields["qh"]).view("<u4")  # (n, 1)
        codes = codes | (((qh >> np.arange(QK, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    return codes.astype(np.uint8), d, m


# --- which layers export ----------------------------------------------------------------------


def _describe(qs: LayerQState) -> str:
    kind = "symmetric" if qs.fmt.sym else "asymmetric"
    extra = ", float offsets" if qs.zero_kind == "float" else ""
    return f"{kind} {qs.fmt.bits}-bit{extra}"


def _nearest(fmt: WeightFormat) -> str:
    """The exportable format closest to ``fmt`` (bits up to 4/5/8, groups to a multiple of
    32, float16 scales), with its GGUF type."""
    bits = 4 if fmt.bits < 4 else fmt.bits if fmt.bits in (4, 5) else 8
    sym = fmt.sym or bits == 8
    g = fmt.group_size
    if g > 0 and g % QK:
        g = max(QK, g // QK * QK)
    near = WeightFormat(bits, g, sym, "float16")
    block = block_type_for(bits, not sym)
    assert block is not None
    return f"nearest exportable: {near.label()} ({block.name})"


def _blocks_of(qs: LayerQState) -> BlockType | None:
    """The block type of a layer's (bits, offset) combination, if GGUF has one."""
    asymmetric = qs.zero_kind == "float" or not qs.fmt.sym
    return block_type_for(qs.fmt.bits, asymmetric)


def _contiguous_g_idx(qs: LayerQState) -> bool:
    """Whether a layer's ``g_idx`` (if any) is just the contiguous group assignment."""
    if qs.g_idx is None:
        return True
    cols = qs.codes.shape[1]
    natural = torch.arange(cols, device=qs.g_idx.device) // qs.fmt.group_cols(cols)
    return qs.fmt.group_size > 0 and torch.equal(qs.g_idx.long(), natural)


def _refusal(qs: LayerQState) -> tuple[str, str] | None:
    """(why, what exports instead) for a layer GGUF cannot hold exactly; None if it can."""
    fmt, cols = qs.fmt, qs.codes.shape[1]
    if qs.outliers is not None:
        return (f"its outlier side channel ({qs.outliers.idx.numel()} weights stored apart) "
                "has no GGUF equivalent", f"nearest exportable: {fmt.label()} without outliers")
    if not _contiguous_g_idx(qs):
        return ("act-order with dynamic groups (g_idx): its groups are not contiguous runs of "
                "columns, and GGUF blocks are", "re-run GPTQ with `static_groups: true` "
                "(act-order with groups fixed first), which exports")
    if not qs.codes_in_range():
        return f"its codes leave [0, {fmt.maxq}]", EXPORTABLE
    block = _blocks_of(qs)
    if block is None:
        why = (f"GGUF has no exact {fmt.bits}-bit type" if fmt.bits not in (4, 5, 8) else
               "GGUF's 8-bit type Q8_0 is symmetric (no offset)")
        return why, _nearest(fmt)
    if fmt.group_size > 0 and fmt.group_size % QK:
        return (f"GGUF blocks hold {QK} weights with one scale; group size {fmt.group_size} "
                f"is not a multiple of {QK}", _nearest(fmt))
    if cols % QK:
        return f"its width {cols} is not a multiple of the GGUF block ({QK})", EXPORTABLE
    return _constants_refusal(qs, block)


def _constants_refusal(qs: LayerQState, block: BlockType) -> tuple[str, str] | None:
    """Refuse scales that float16 (the block scale type) does not hold exactly, symmetric
    zero points other than 2^(b-1), and offsets beyond float16's range."""
    s = qs.scale.detach().float().cpu()
    if not (torch.isfinite(s).all() and torch.equal(s.half().float(), s)):
        return (f"its scales (scale_dtype {qs.fmt.scale_dtype}) are not exactly representable "
                "in float16, GGUF's block scale type",
                f"nearest exportable: {qs.fmt.label()} with scale_dtype float16")
    if not block.offset and not bool((qs.zero == block.centre).all()):
        return f"its zero points are not all {block.centre}, {block.name}'s centre", EXPORTABLE
    if block.offset and not np.isfinite(_offsets(qs).astype(np.float16)).all():
        return "a block offset exceeds float16's range", EXPORTABLE
    return None


def check_exportable(qstate: dict[str, LayerQState]) -> dict[str, str]:
    """The GGUF block type of every layer, or a one-line refusal of the first that has none.

    Args:
        qstate: layer name -> its quantization state.

    Returns:
        layer name -> GGUF type name (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``).

    Raises:
        ExportRefused: a layer's format has no exact GGUF type; the message names the layer,
            its format and the nearest exportable format (and how many more layers fail).

    Example:
        >>> check_exportable({"up": quantize_tensor(w, WeightFormat(4, 64))})
        {'up': 'Q4_1'}
        >>> check_exportable({"up": quantize_tensor(w, WeightFormat(3, 64))})
        ExportRefused: gguf: layer up is w3g64 (asymmetric 3-bit); GGUF has no exact 3-bit ...
    """
    refused = {name: r for name, qs in qstate.items() if (r := _refusal(qs)) is not None}
    if refused:
        name, (why, instead) = next(iter(refused.items()))
        qs = qstate[name]
        more = f" (and {len(refused) - 1} more layers)" if len(refused) > 1 else ""
        raise ExportRefused(f"gguf: layer {name} is {qs.fmt.label()} ({_describe(qs)}); "
                            f"{why}; {instead}{more}")
    return {name: _blocks_of(qs).name for name, qs in qstate.items()}  # type: ignore[union-attr]


# --- a layer's blocks -------------------------------------------------------------------------


def _per_block(p: torch.Tensor, qs: LayerQState) -> np.ndarray:
    """Per-group parameters (rows, groups) or (1, 1) as one value per block (rows, cols/32)."""
    rows, cols = qs.codes.shape
    p = p.detach().cpu().to(torch.float64)
    if qs.fmt.group_size == PER_TENSOR:
        return np.full((rows, cols // QK), float(p.reshape(-1)[0]))
    g = cols if qs.fmt.group_size == PER_CHANNEL else qs.fmt.group_size
    return p.repeat_interleave(g // QK, dim=1).numpy()  # (rows, cols / 32)


def _offsets(qs: LayerQState) -> np.ndarray:
    """The exact per-block offset m (float64, before float16 rounding): -scale * zero for
    integer zero points, s * alpha + z for float offsets (both exact in float64)."""
    s, z = _per_block(qs.scale, qs), _per_block(qs.zero, qs)
    if qs.zero_kind == "float":
        alpha, _ = signed_grid(qs.fmt.bits)
        return s * alpha + z
    return -s * z


def layer_blocks(qs: LayerQState) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A layer as (codes (rows, cols) uint8, d (rows, cols/32) float16, m float16 or None)."""
    block = _blocks_of(qs)
    assert block is not None
    codes = qs.codes.detach().cpu().numpy().astype(np.uint8)
    d = _per_block(qs.scale, qs).astype(np.float16)
    m = _offsets(qs).astype(np.float16) if block.offset else None
    return codes, d, m


def stored_weight(qs: LayerQState) -> torch.Tensor:
    """The float32 (rows, cols) weight a GGUF file holds for a layer: ``d q + m`` with its
    float16 offsets (``qs.dequantize()`` exactly for the symmetric types, which have none)."""
    codes, d, m = layer_blocks(qs)
    if m is None:
        return qs.dequantize().float()
    d32 = torch.from_numpy(d.astype(np.float32)).repeat_interleave(QK, dim=1)
    m32 = torch.from_numpy(m.astype(np.float32)).repeat_interleave(QK, dim=1)
    return d32 * torch.from_numpy(codes).float() + m32


def _encode_layer(qtype: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None
                  ) -> np.ndarray:
    """Rows of blocks: uint8 (rows, cols/32 * block bytes)."""
    rows = codes.shape[0]
    raw = encode_blocks(qtype, codes.reshape(-1, QK), d.reshape(-1),
                        None if m is None else m.reshape(-1))
    return raw.reshape(rows, -1)


# --- model families ---------------------------------------------------------------------------


def _rope(config: Any) -> dict[str, Any]:
    """RoPE parameters (transformers >= 5 keeps them in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return {"rope_theta": getattr(config, "rope_theta", None) or 10000.0, **(params or {})}


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attr(name: str) -> Callable[[Any], Any]:
    return lambda config: getattr(config, name)


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers model type is written as a GGUF architecture.

    Attributes:
        arch: the llama.cpp architecture.
        hparams: (GGUF key with ``{arch}``, value from the transformers config, value type).
        rope_permuted: tensors whose rows llama.cpp interleaves per head, with the key of
            their head count.
    """

    arch: MODEL_ARCH
    hparams: tuple[tuple[str, Callable[[Any], Any], GGUFValueType], ...]
    rope_permuted: tuple[tuple[MODEL_TENSOR, str], ...]

    @property
    def arch_name(self) -> str:
        """The value of ``general.architecture``."""
        return MODEL_ARCH_NAMES[self.arch]

    def key(self, template: str) -> str:
        """A ``{arch}`` key template filled in."""
        return template.format(arch=self.arch_name)


_U32, _F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(
        arch=MODEL_ARCH.LLAMA,
        hparams=(
            (Keys.LLM.CONTEXT_LENGTH, _attr("max_position_embeddings"), _U32),
            (Keys.LLM.EMBEDDING_LENGTH, _attr("hidden_size"), _U32),
            (Keys.LLM.BLOCK_COUNT, _attr("num_hidden_layers"), _U32),
            (Keys.LLM.FEED_FORWARD_LENGTH, _attr("intermediate_size"), _U32),
            (Keys.Attention.HEAD_COUNT, _attr("num_attention_heads"), _U32),
            (Keys.Attention.HEAD_COUNT_KV, _attr("num_key_value_heads"), _U32),
            (Keys.Rope.FREQ_BASE, lambda c: float(_rope(c)["rope_theta"]), _F32),
            (Keys.Attention.LAYERNORM_RMS_EPS, _attr("rms_norm_eps"), _F32),
            (Keys.Rope.DIMENSION_COUNT, _head_dim, _U32),
            (Keys.LLM.VOCAB_SIZE, _attr("vocab_size"), _U32),
        ),
        rope_permuted=((MODEL_TENSOR.ATTN_Q, Keys.Attention.HEAD_COUNT),
                       (MODEL_TENSOR.ATTN_K, Keys.Attention.HEAD_COUNT_KV)),
    ),
}


def family_of(config: Any) -> GGUFFamily:
    """The GGUF family of a transformers config; other model types are refused."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ExportRefused(f"gguf: model_type {config.model_type!r} is not exported; "
                            f"accepted: {', '.join(sorted(FAMILIES))}")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type != "default":
        raise ExportRefused(f"gguf: RoPE scaling {rope_type!r} is not exported; accepted: "
                            "plain RoPE (rope_type 'default')")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportRefused("gguf: LLaMA with attention or MLP biases is not exported; "
                            "accepted: bias-free LLaMA")
    return family


def rope_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's layout: GGUF row i is transformers row ``rope_rows(...)[i]``
    (per head, the rotate-half halves [x0..x(h/2-1) | y0..] become pairs (x0, y0, x1, y1 ..))."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _row_orders(family: GGUFFamily, hparams: dict[str, Any]
                ) -> Callable[[MODEL_TENSOR, int], np.ndarray | None]:
    """tensor kind, rows -> the GGUF row order of a rope-permuted tensor (None: unchanged)."""
    heads = {t: int(hparams[family.key(k)]) for t, k in family.rope_permuted}

    def order(tensor: MODEL_TENSOR, rows: int) -> np.ndarray | None:
        return rope_rows(rows, heads[tensor]) if tensor in heads else None

    return order


# --- tokenizer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    """One GGUF key/value with its value type (and element type for arrays)."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def template_tokenizer(template: Path) -> list[KV]:
    """Every ``tokenizer.*`` key of a GGUF file, with its stored type, verbatim."""
    reader = GGUFReader(template)
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            out.append(KV(key, field.contents(), field.types[0], sub))
    if not out:
        raise DataError(f"gguf: the template {template} has no tokenizer.* keys")
    return out


# pre-tokenizers of tokenizer.json that a llama.cpp pre-tokenizer type reproduces
_PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}): "gpt-2",
}


def _special(config: dict[str, Any], what: str) -> str | None:
    tok = config.get(what)
    return tok.get("content") if isinstance(tok, dict) else tok


def _pre_type(tokenizer: dict[str, Any]) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    sig = json.dumps({k: pre.get(k) for k in ("type", "add_prefix_space", "use_regex")})
    name = _PRE_TOKENIZERS.get(sig)
    if name is None or tokenizer.get("normalizer") is not None:
        raise ExportRefused(f"gguf: tokenizer pre-tokenizer {pre.get('type')!r} (normalizer "
                            f"{tokenizer.get('normalizer')!r}) has no known llama.cpp "
                            "equivalent; accepted: byte-level BPE without a normalizer, or a "
                            "template GGUF")
    return name


def _vocab(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with their llama.cpp token types, padded to the model's vocab."""
    by_id = {i: (t, TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n = max(by_id) + 1
    if n > vocab_size or len(by_id) != n:
        raise ExportRefused(f"gguf: the tokenizer has {len(by_id)} tokens with ids up to "
                            f"{n - 1}; accepted: ids 0..{vocab_size - 1} without gaps")
    for i in range(n, vocab_size):  # embedding rows the tokenizer never produces
        by_id[i] = (f"[PAD{i}]", TokenType.UNUSED)
    return [by_id[i][0] for i in range(vocab_size)], [int(by_id[i][1]) for i in range(vocab_size)]


def json_tokenizer(tokenizer_dir: Path, vocab_size: int) -> list[KV]:
    """``tokenizer.*`` keys ("gpt2" byte-level BPE) from a transformers tokenizer directory."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"gguf: no tokenizer.json in {tokenizer_dir}")
    tokenizer = json.loads(path.read_text())
    if tokenizer["model"].get("type") != "BPE":
        raise ExportRefused(f"gguf: tokenizer model {tokenizer['model'].get('type')!r} is not "
                            "exported from tokenizer.json; accepted: BPE, or a template GGUF")
    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tokens, types = _vocab(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    single = (tokenizer.get("post_processor") or {}).get("single") or [{}]
    S, U32, B = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    kvs = [KV(Keys.Tokenizer.MODEL, "gpt2", S), KV(Keys.Tokenizer.PRE, _pre_type(tokenizer), S),
           KV(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, S),
           KV(Keys.Tokenizer.TOKEN_TYPE, types, GGUFValueType.ARRAY, GGUFValueType.INT32),
           KV(Keys.Tokenizer.MERGES, merges, GGUFValueType.ARRAY, S),
           KV(Keys.Tokenizer.ADD_BOS, "SpecialToken" in single[0], B)]
    ids = {t: i for i, t in enumerate(tokens)}
    for key, what in ((Keys.Tokenizer.BOS_ID, "bos_token"), (Keys.Tokenizer.EOS_ID, "eos_token"),
                      (Keys.Tokenizer.UNK_ID, "unk_token"), (Keys.Tokenizer.PAD_ID, "pad_token")):
        if (tok := _special(config, what)) in ids:
            kvs.append(KV(key, ids[tok], U32))
    if isinstance(config.get("chat_template"), str):
        kvs.append(KV(Keys.Tokenizer.CHAT_TEMPLATE, config["chat_template"], S))
    return kvs


def _tokenizer_kvs(template: Path | None, tokenizer_dir: Path | None, vocab_size: int
                   ) -> tuple[list[KV], str]:
    if template is not None:
        kvs = template_tokenizer(template)
        n = next((len(kv.value) for kv in kvs if kv.key == Keys.Tokenizer.LIST), vocab_size)
        if n != vocab_size:
            raise ExportRefused(f"gguf: the template {template.name} has {n} tokens, the "
                                f"model {vocab_size}; accepted: the model's own tokenizer")
        return kvs, f"template {template.name}"
    if tokenizer_dir is not None:
        return json_tokenizer(tokenizer_dir, vocab_size), f"{tokenizer_dir}/tokenizer.json"
    raise ExportRefused("gguf: llama.cpp needs a tokenizer; accepted: a template GGUF or a "
                        "tokenizer directory with tokenizer.json")


# --- tensors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray  # float32/float16 values, or uint8 blocks
    qtype: GGMLQuantizationType


def _tensors(model: torch.nn.Module, qstate: dict[str, LayerQState], types: dict[str, str],
             family: GGUFFamily, hparams: dict[str, Any], float_type: str
             ) -> Iterator[_Tensor]:
    """Every tensor of the file: quantized layers as blocks, the rest as F32 (F16)."""
    config = model.config  # type: ignore[attr-defined]
    n_blocks = int(config.num_hidden_layers)
    names = get_tensor_name_map(family.arch, n_blocks)
    order = _row_orders(family, hparams)
    quantized = {f"{layer}.weight": layer for layer in qstate}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads a missing output as the tied embedding
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportRefused(f"gguf: tensor {key} has no {family.arch_name} GGUF name")
        kind, gguf_name = found
        if key in quantized:
            qs = qstate[quantized.pop(key)]
            if tuple(qs.codes.shape) != tuple(value.shape):
                raise ExportRefused(f"gguf: layer {key} has codes {tuple(qs.codes.shape)} but "
                                    f"the model's weight is {tuple(value.shape)}")
            qtype = types[key.removesuffix(".weight")]
            yield _quantized(gguf_name, qs, qtype, order(kind, value.shape[0]))
        else:
            yield _float(gguf_name, value, float_type, order(kind, value.shape[0]))
    if quantized:
        raise ExportRefused(f"gguf: layers {sorted(quantized.values())[:3]} are not in the "
                            "model")


def _quantized(name: str, qs: LayerQState, qtype: str, rows: np.ndarray | None) -> _Tensor:
    codes, d, m = layer_blocks(qs)
    if rows is not None:  # a row permutation keeps every block whole
        codes, d = codes[rows], d[rows]
        m = None if m is None else m[rows]
    return _Tensor(name, _encode_layer(qtype, codes, d, m), BLOCK_TYPES[qtype].qtype)


def _float(name: str, value: torch.Tensor, float_type: str, rows: np.ndarray | None) -> _Tensor:
    data = value.detach().float().cpu().numpy()
    if rows is not None:
        data = data[rows]
    if float_type == "f16" and data.ndim > 1:  # 1-d tensors (norms) stay F32, as llama.cpp's
        return _Tensor(name, data.astype(np.float16), GGMLQuantizationType.F16)
    return _Tensor(name, np.ascontiguousarray(data, dtype=np.float32), GGMLQuantizationType.F32)


# --- the file ---------------------------------------------------------------------------------


def _metadata_kv(key: str, value: str | int | float) -> KV:
    """A caller's provenance item as a ``qbench.*`` key (bools, 64-bit ints and floats)."""
    key = key if key.startswith("qbench.") else f"qbench.{key}"
    for py, vtype in ((bool, GGUFValueType.BOOL), (int, GGUFValueType.INT64),
                      (float, GGUFValueType.FLOAT64), (str, GGUFValueType.STRING)):
        if isinstance(value, py):
            return KV(key, value, vtype)
    raise ExportRefused(f"gguf: metadata {key} is a {type(value).__name__}; accepted: str, "
                        "int, float")


def _header(family: GGUFFamily, config: Any, hparams: dict[str, Any], file_type: LlamaFileType,
            metadata: dict[str, str | int | float]) -> list[KV]:
    S, U32 = GGUFValueType.STRING, GGUFValueType.UINT32
    name = Path(str(getattr(config, "name_or_path", "") or family.arch_name)).name
    kvs = [KV(Keys.General.NAME, name, S), KV(Keys.General.FILE_TYPE, int(file_type), U32),
           KV(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, U32)]
    kvs += [KV(family.key(k), hparams[family.key(k)], t) for k, _, t in family.hparams]
    return kvs + [_metadata_kv(k, v) for k, v in metadata.items()]


def _file_type(tensors: list[_Tensor], float_type: str) -> LlamaFileType:
    """``general.file_type``: the most common quantized type (MOSTLY_...)."""
    quant = Counter(t.qtype.name for t in tensors if t.qtype.name in BLOCK_TYPES)
    if not quant:
        return LlamaFileType.MOSTLY_F16 if float_type == "f16" else LlamaFileType.ALL_F32
    return LlamaFileType[f"MOSTLY_{quant.most_common(1)[0][0]}"]


def _write(path: Path, arch: str, kvs: list[KV], tensors: list[_Tensor]) -> None:
    writer = GGUFWriter(path, arch)
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model: torch.nn.Module, qstate: dict[str, LayerQState], out_file: Path, *,
               template: Path | None = None, tokenizer_dir: Path | None = None,
               metadata: dict[str, str | int | float] | None = None,
               float_type: str = "f32") -> dict[str, Any]:
    """Write a quantized model as one GGUF file, atomically; refuse before writing anything.

    Args:
        model: the transformers model (its float tensors: embeddings, norms, untied lm_head).
        qstate: layer name (as in ``model``) -> quantization state; these layers are written
            as GGML blocks from their codes, whatever ``model`` holds for them.
        out_file: the .gguf file to write (replaced atomically).
        template: a GGUF file whose ``tokenizer.*`` keys are copied verbatim.
        tokenizer_dir: otherwise, a directory with a byte-level BPE ``tokenizer.json``.
        metadata: provenance written as ``qbench.<key>`` (str, int or float).
        float_type: ``"f32"`` or ``"f16"`` for the unquantized matrices (1-d tensors stay F32).

    Returns:
        ``{"path", "bytes", "tensors": {GGUF type: count}, "file_type", "tokenizer"}``.

    Raises:
        ExportRefused: a layer, the model family or the tokenizer cannot be written exactly.

    Example:
        >>> write_gguf(model, qstate, Path("out/model.gguf"), tokenizer_dir=Path(model_dir),
        ...            metadata={"run_key": key, "method": "rtn"})
    """
    if float_type not in ("f32", "f16"):
        raise ExportRefused(f"gguf: float_type {float_type!r}; accepted: f32, f16")
    config = model.config  # type: ignore[attr-defined]
    family = family_of(config)
    types = check_exportable(qstate)
    hparams = {family.key(k): get(config) for k, get, _ in family.hparams}
    tok_kvs, tok_source = _tokenizer_kvs(template, tokenizer_dir, int(config.vocab_size))
    tensors = list(_tensors(model, qstate, types, family, hparams, float_type))
    file_type = _file_type(tensors, float_type)
    kvs = _header(family, config, hparams, file_type, metadata or {}) + tok_kvs
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write(Path(tmp), family.arch_name, kvs, tensors)
        os.replace(tmp, out_file)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(out_file), "bytes": out_file.stat().st_size,
            "tensors": dict(Counter(t.qtype.name for t in tensors)),
            "file_type": file_type.name, "tokenizer": tok_source}


# --- reading back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFLayer:
    """One quantized tensor read back from a GGUF file, in transformers' row order.

    Attributes:
        qtype: GGUF type name.
        codes: uint8 (rows, cols) unsigned codes (qbench's convention: Q4_0's q, Q8_0's
            int8 + 128).
        d: float32 (rows, cols / 32) block scales.
        m: float32 (rows, cols / 32) block offsets (Q4_1, Q5_1), else None.
    """

    qtype: str
    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise DataError(f"gguf: the file has no {key} key")
    return field.contents()


def read_qstate(gguf_file: Path, names: list[str] | None = None) -> dict[str, GGUFLayer]:
    """Decode a GGUF file's quantized tensors back to codes and block constants.

    Args:
        gguf_file: a file written by ``write_gguf`` (or any LLaMA GGUF with these types).
        names: transformers layer names to read; None reads every quantized target layer of
            the family's adapter (``suite.models``) that the file holds.

    Returns:
        layer name -> ``GGUFLayer`` with the Q/K row permutation undone.
    """
    from suite.models import adapter_for

    reader = GGUFReader(gguf_file)
    arch = _field(reader, Keys.General.ARCHITECTURE)
    model_type, family = next(((t, f) for t, f in FAMILIES.items() if f.arch_name == arch),
                              (None, None))
    if family is None:
        raise DataError(f"gguf: architecture {arch!r} is not read; accepted: "
                        f"{', '.join(f.arch_name for f in FAMILIES.values())}")
    n_blocks = int(_field(reader, family.key(Keys.LLM.BLOCK_COUNT)))
    hparams = {family.key(k): _field(reader, family.key(k)) for _, k in family.rope_permuted}
    order = _row_orders(family, hparams)
    tensor_names = get_tensor_name_map(family.arch, n_blocks)
    quantized = {t.name: t for t in reader.tensors if t.tensor_type.name in BLOCK_TYPES}
    if names is None:
        adapter = adapter_for(model_type)
        names = [n for n in (f"{adapter.blocks}.{i}.{lin}" for i in range(n_blocks)
                             for group in adapter.linears for lin in group)
                 if tensor_names.get_name(f"{n}.weight", (".weight",)) in quantized]
    return {n: _read_layer(n, quantized, tensor_names, order) for n in names}


def _read_layer(name: str, quantized: dict[str, Any], tensor_names: Any,
                order: Callable[[MODEL_TENSOR, int], np.ndarray | None]) -> GGUFLayer:
    """One layer's blocks decoded, in transformers' row order."""
    kind, gguf_name = tensor_names.get_type_and_name(f"{name}.weight", (".weight",)) or (None, "")
    t = quantized.get(gguf_name)
    if t is None:
        raise DataError(f"gguf: {name} is not a quantized tensor of the file")
    qtype = t.tensor_type.name
    raw = np.asarray(t.data)  # (rows, bytes per row)
    rows = raw.shape[0]
    codes, d, m = decode_blocks(qtype, raw.reshape(-1, GGML_QUANT_SIZES[t.tensor_type][1]))
    codes, d = codes.reshape(rows, -1), d.reshape(rows, -1)
    m = None if m is None else m.reshape(rows, -1)
    perm = order(kind, rows)
    if perm is not None:
        inv = np.argsort(perm)
        codes, d = codes[inv], d[inv]
        m = None if m is None else m[inv]
    return GGUFLayer(qtype, codes, d, m)
