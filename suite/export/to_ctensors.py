"""Export a quantized transformers model as a compressed-tensors checkpoint.

The directory holds ``model.safetensors`` and a ``config.json`` whose ``quantization_config``
is what transformers (``CompressedTensorsHfQuantizer``) and vLLM read; it is written by the
library itself (``ModelCompressor.update_config``) and validated with its pydantic model.
Every quantized linear becomes the tensors of compressed-tensors' ``pack-quantized`` format
(the format the library infers for weight-only integer schemes, 8 bits included):

* ``weight_packed`` int32 (rows, ceil(cols b / 32)): the signed codes ``q - 2^(b-1)`` packed
  densely by the library's ``pack_to_int32`` (it takes integer codes, so nothing is
  requantized);
* ``weight_scale`` (rows, groups) for ``group``, (rows, 1) for ``channel``, (1,) for
  ``tensor``;
* ``weight_zero_point`` (asymmetric only): ``zero - 2^(b-1)`` as int8, packed along the rows
  for ``group`` / ``channel``, plain (1,) for ``tensor``;
* ``weight_shape`` int64 (2,).

compressed-tensors decompresses ``w = scale * (q_ct - zero_ct)`` (``quantization/lifecycle/
forward_helpers.py::_dequantize``), which equals qbench's ``scale * (codes - zero)`` since both
offsets cancel. The arithmetic runs in the stored scale's dtype, so scales are stored in the
layer's weight dtype (as llm-compressor does) when that holds them exactly, else in float32:
a float32 model's decompressed weights are then bit-identical to ``LayerQState.dequantize()``.

What compressed-tensors 0.20.1 cannot carry is refused (``ExportRefused``) before anything is
written: act-order with dynamic groups (``actorder: group`` and its ``weight_g_idx`` were
removed from the library; export the same format with ``static_groups``), outlier side
channels, and float offsets (decoupleQ) unless every offset is an integer multiple of its
scale (then the integer zero point is exact and is exported). compressed-tensors has no float
zero point: ``zp_dtype`` only names the dtype of ``zero_point`` in ``scale * (q - zero_point)``,
a float offset ``z`` would need ``zero_point = -z / scale``, which no dtype holds exactly, and
``pack-quantized`` packs zero points as b-bit integers.

Loading on CPU (transformers 5.25; ``run_compressed=False`` is the deprecated spelling)::

    AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True))

Known consumer limits, both outside this module (pinned as strict xfails in the tests):

* transformers' ``dequantize=True`` path decompresses every dense module with the *first*
  config group's scheme (``integrations/compressed_tensors.py::get_dense_scheme``): a
  checkpoint with several schemes loads correctly only through the default path;
* the default path (``dequantize=False``: decompressed on the first forward pass) fails for
  asymmetric ``group`` / ``channel`` schemes: compressed-tensors' compress on meta tensors
  (``PackedQuantizationCompressor.compress``) leaves ``weight_zero_point`` unpacked, so its
  shape mismatches the packed one that the library's own writer stores too.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.errors import ConfigError, DataError, ExportRefused, HonestyError
from suite.primitives import (
    PER_CHANNEL,
    PER_TENSOR,
    LayerQState,
    WeightFormat,
    signed_grid,
    to_storage,
)

WEIGHTS_NAME = "model.safetensors"
CT_FORMAT = "pack-quantized"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
_EXACT_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (codes uint8 (rows, cols), scale float32 (rows, groups), zero float32, g_idx or None)
QStateTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class CtScheme:
    """The compressed-tensors weight scheme of one layer (``QuantizationArgs`` fields).

    Attributes:
        bits: ``num_bits``, 2..8.
        strategy: ``group``, ``channel`` or ``tensor``.
        group_size: input columns per group for ``group``, else None.
        symmetric: no zero point stored (qbench's zero fixed at 2^(b-1)).
    """

    bits: int
    strategy: str
    group_size: int | None
    symmetric: bool

    def weight_args(self) -> dict[str, Any]:
        """Keyword arguments of compressed-tensors' ``QuantizationArgs`` for the weights."""
        args: dict[str, Any] = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                                "strategy": self.strategy, "dynamic": False}
        if self.group_size is not None:
            args["group_size"] = self.group_size
        return args

    def describe(self) -> str:
        """One line, e.g. ``pack-quantized int4 group(32) asymmetric``."""
        g = f"({self.group_size})" if self.group_size is not None else ""
        return (f"{CT_FORMAT} int{self.bits} {self.strategy}{g} "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")


@dataclass(frozen=True)
class _Plan:
    """What one layer exports: its scheme and the integer zero points (qbench convention)."""

    scheme: CtScheme
    zero: torch.Tensor


# --- what compressed-tensors can represent ------------------------------------------------


def _mid(bits: int) -> int:
    """compressed-tensors' signed offset 2^(b-1): q_ct = q - 2^(b-1)."""
    return -signed_grid(bits)[0]


def _strategy(fmt: WeightFormat) -> tuple[str, int | None]:
    """compressed-tensors ``(strategy, group_size)`` of a qbench group size."""
    if fmt.group_size == PER_TENSOR:
        return "tensor", None
    if fmt.group_size == PER_CHANNEL:
        return "channel", None
    return "group", fmt.group_size


def _static_g_idx(qs: LayerQState) -> bool:
    """Whether ``qs.g_idx`` is absent or the contiguous assignment ``c // g`` (static groups)."""
    if qs.g_idx is None:
        return True
    cols = qs.codes.shape[1]
    return torch.equal(qs.g_idx.cpu().long(), torch.arange(cols) // qs.fmt.group_cols(cols))


def _integer_zero(qs: LayerQState) -> torch.Tensor | None:
    """Integer zero points Z with ``scale * (codes - Z)`` bit-identical to ``qs.dequantize()``,
    or None when there are none in [0, 2^b - 1] (a float offset that is no multiple of its
    scale, or an out-of-range zero)."""
    if qs.zero_kind == "int":
        zero = qs.zero
    else:  # s (u + alpha) + z == s (u - Z)  <=>  Z = -alpha - z / s
        alpha, _ = signed_grid(qs.fmt.bits)
        zero = torch.round(-alpha - qs.zero / qs.scale)
        as_int = LayerQState(qs.codes, qs.scale, zero, qs.fmt, g_idx=qs.g_idx)
        if not torch.equal(as_int.dequantize(), qs.dequantize()):
            return None
    integral = torch.equal(zero, zero.round())
    if not integral or bool(zero.min() < 0) or bool(zero.max() > qs.fmt.maxq):
        return None
    return zero.float()


def _shapes_ok(qs: LayerQState) -> bool:
    """Codes (rows, cols) and scale / zero shaped (rows, groups), (1, 1) per-tensor."""
    if qs.codes.dim() != 2:
        return False
    rows, cols = qs.codes.shape
    fmt = qs.fmt
    if fmt.group_size > 0 and cols % fmt.group_size:
        return False
    want = (1, 1) if fmt.group_size == PER_TENSOR else (rows, cols // fmt.group_cols(cols))
    return tuple(qs.scale.shape) == want and tuple(qs.zero.shape) == want


def _refusal(name: str, qs: LayerQState) -> str | None:
    """Why ``qs`` has no exact compressed-tensors form (None when it has one)."""
    label = qs.fmt.label()
    head = f"layer {name!r} (format {label}): "
    if qs.outliers is not None:
        return (head + "its outlier side channel has no compressed-tensors representation; "
                f"nearest exportable format: {label} without outliers")
    if not _static_g_idx(qs):
        return (head + "act-order with dynamic groups needs a g_idx, which compressed-tensors "
                "0.20.1 no longer carries (actorder 'group' was removed); nearest exportable "
                f"format: {label} with static_groups")
    if not _shapes_ok(qs) or not qs.codes_in_range():
        return head + "codes / scales / zeros do not have the format's shapes and ranges"
    if not torch.equal(to_storage(qs.scale, qs.fmt), qs.scale.float()):
        return (head + f"scales are not representable in its scale_dtype {qs.fmt.scale_dtype}; "
                f"nearest exportable format: {label} with rounded scales")
    if _integer_zero(qs) is None:
        kind = ("float offsets (decoupleQ) that are not integer multiples of their scales"
                if qs.zero_kind == "float" else "zero points outside [0, 2^b - 1]")
        return (head + f"{kind}; compressed-tensors stores w = scale * (q - zero_point) with "
                f"integer zero points; nearest exportable format: {label} with integer zero "
                "points (e.g. RTN or GPTQ)")
    return None


def _plan(qs: LayerQState) -> _Plan:
    """The scheme and integer zeros of an exportable layer (see ``_refusal``)."""
    zero = _integer_zero(qs)
    assert zero is not None
    strategy, group_size = _strategy(qs.fmt)
    symmetric = bool(qs.fmt.sym and torch.all(zero == _mid(qs.fmt.bits)))
    return _Plan(CtScheme(qs.fmt.bits, strategy, group_size, symmetric), zero)


def check_exportable(qstate: dict[str, LayerQState]) -> dict[str, str]:
    """Check that compressed-tensors represents every layer exactly.

    Args:
        qstate: the quantization state per layer (dotted names in the HF model).

    Returns:
        layer name -> scheme description, e.g. ``pack-quantized int4 group(32) asymmetric``.

    Raises:
        ExportRefused: one line naming the first refused layer, its format, why, and the
            nearest exportable format (plus how many layers were refused).
    """
    if not qstate:
        raise ExportRefused("no quantized layers in the quantization state; nothing to export")
    reasons = {n: r for n, qs in qstate.items() if (r := _refusal(n, qs)) is not None}
    if reasons:
        first = next(iter(reasons.values()))
        more = f" ({len(reasons)} of {len(qstate)} layers refused)" if len(reasons) > 1 else ""
        raise ExportRefused(f"compressed-tensors export refused: {first}{more}")
    return {n: _plan(qs).scheme.describe() for n, qs in qstate.items()}


# --- tensors -------------------------------------------------------------------------------


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """qbench's unsigned codes 0..2^b-1 as compressed-tensors' int8 codes -2^(b-1)..2^(b-1)-1."""
    return (codes.to(torch.int16) - _mid(bits)).to(torch.int8)


def _scale_dtype(qs: LayerQState, weight_dtype: torch.dtype) -> torch.dtype:
    """The layer's weight dtype when it holds the scales exactly (llm-compressor's choice, and
    the dtype compressed-tensors decompresses in), else float32."""
    if weight_dtype in _EXACT_SCALE_DTYPES and torch.equal(
            qs.scale.to(weight_dtype).float(), qs.scale.float()):
        return weight_dtype
    return torch.float32


def _ct_params(scheme: CtScheme, p: torch.Tensor) -> torch.Tensor:
    """Per-group parameters (rows, groups) in compressed-tensors' shape for ``scheme``."""
    return p.reshape(1) if scheme.strategy == "tensor" else p


def _layer_tensors(qs: LayerQState, plan: _Plan, scale_dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """The module-local compressed tensors of one layer (``weight_packed``, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, scheme = qs.fmt.bits, plan.scheme
    out = {
        "weight_packed": pack_to_int32(_signed(qs.codes, bits), bits),  # (rows, ceil(cols b/32))
        "weight_scale": _ct_params(scheme, qs.scale).to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(tuple(qs.codes.shape), dtype=torch.int64),
    }
    if not scheme.symmetric:
        zp = _signed(plan.zero, bits)  # (rows, groups) int8
        out["weight_zero_point"] = (zp.reshape(1) if scheme.strategy == "tensor"
                                    else pack_to_int32(zp, bits, packed_dim=0))
    return out


def _ct_scheme(scheme: CtScheme, targets: list[str]) -> Any:
    """compressed-tensors' ``QuantizationScheme`` (weights only) for ``targets``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**scheme.weight_args()),
                              format=CT_FORMAT)


def _verify_layer(name: str, qs: LayerQState, plan: _Plan, tensors: dict[str, torch.Tensor]
                  ) -> None:
    """Decompress ``tensors`` with the library's own compressor (float32 scales) and demand the
    weight ``qs`` represents, bit for bit."""
    from compressed_tensors.compressors import BaseCompressor

    local = dict(tensors, weight_scale=tensors["weight_scale"].float())
    compressor = BaseCompressor.get_value_from_registry(CT_FORMAT)
    weight = compressor.decompress(local, _ct_scheme(plan.scheme, ["Linear"]))["weight"]
    if not torch.equal(weight.float(), qs.dequantize()):
        raise HonestyError(f"compressed-tensors export of layer {name!r}: the library's "
                           "decompression differs from the quantization state")


# --- config --------------------------------------------------------------------------------


def _groups(plans: dict[str, _Plan]) -> dict[CtScheme, list[str]]:
    """Layers per distinct scheme, in first-seen order."""
    out: dict[CtScheme, list[str]] = {}
    for name, plan in plans.items():
        out.setdefault(plan.scheme, []).append(name)
    return out


def _quantization_config(model: nn.Module, plans: dict[str, _Plan]) -> Any:
    """compressed-tensors' ``QuantizationConfig``: one scheme targets ``Linear`` (the usual
    form, what vLLM matches best); several schemes target their layers by name. ``ignore``
    lists every other linear (lm_head, ...)."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = _groups(plans)
    single = len(groups) == 1
    config_groups = {f"group_{i}": _ct_scheme(s, ["Linear"] if single else names)
                     for i, (s, names) in enumerate(groups.items())}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in plans]
    return QuantizationConfig(config_groups=config_groups, format=CT_FORMAT,
                              quantization_status="compressed", ignore=ignore)


def _check_targets(model: nn.Module, qconfig: Any, plans: dict[str, _Plan]) -> None:
    """The library's own matcher must select exactly each group's layers."""
    from compressed_tensors.utils.match import match_named_modules

    groups = _groups(plans)
    for scheme, (gname, group) in zip(groups, qconfig.config_groups.items(), strict=True):
        matched = {n for n, _ in match_named_modules(model, group.targets, qconfig.ignore)}
        if matched != set(groups[scheme]):
            raise HonestyError(f"compressed-tensors config group {gname} matches "
                               f"{sorted(matched ^ set(groups[scheme]))[:3]} wrongly")


def validate_config(config: dict[str, Any]) -> Any:
    """Parse a written ``quantization_config`` as its consumers do: compressed-tensors'
    pydantic model, and transformers' wrapper handed to the library's ``ModelCompressor``
    (the loading path); returns the parsed config, raises if any of them rejects it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    qc = QuantizationConfig.model_validate(config)
    ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(dict(config)))
    if qc.format != CT_FORMAT or config.get("quant_method") != "compressed-tensors":
        raise HonestyError(f"written quantization_config has format {qc.format!r}")
    return qc


def _write_config(model: nn.Module, qconfig: Any, tmp: Path,
                  metadata: dict[str, str | int | float]) -> None:
    """config.json (the model's, with the library-written ``quantization_config`` and a
    ``qbench`` provenance object) and generation_config.json."""
    from compressed_tensors.compressors import ModelCompressor

    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    path = tmp / "config.json"
    config = json.loads(path.read_text())
    validate_config(config["quantization_config"])
    config["qbench"] = {k.removeprefix("qbench."): v for k, v in metadata.items()}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- state dict and files ------------------------------------------------------------------


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied copies dropped (the first name of a storage is kept,
    as ``save_pretrained`` does; transformers re-ties on load)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(),
               tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _checkpoint(model: nn.Module, qstate: dict[str, LayerQState], plans: dict[str, _Plan]
                ) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: unquantized ones as they are, each quantized linear's
    ``weight`` replaced by its compressed tensors (each verified against the library)."""
    state = _untied_state(model)
    for name, qs in qstate.items():
        weight = state.pop(f"{name}.weight")
        tensors = _layer_tensors(qs, plans[name], _scale_dtype(qs, weight.dtype))
        _verify_layer(name, qs, plans[name], tensors)
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _copy_tokenizer(tokenizer_dir: Path, tmp: Path) -> None:
    """Copy the tokenizer files found in ``tokenizer_dir``."""
    found = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not found:
        raise DataError(f"tokenizer_dir: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                        f"...) in {tokenizer_dir}")
    for f in found:
        shutil.copy2(f, tmp / f.name)


def _check_layers(model: nn.Module, qstate: dict[str, LayerQState]) -> None:
    """Every state names a linear of ``model`` whose weight has the codes' shape."""
    modules = dict(model.named_modules())
    for name, qs in qstate.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear) or tuple(m.weight.shape) != tuple(qs.codes.shape):
            raise ConfigError(f"quantization state layer {name!r} is not a linear of the model "
                              f"with weight shape {tuple(qs.codes.shape)}")


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` must be absent or an empty directory."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out: {out_dir} exists and is not an empty directory; accepted: "
                          "a new or empty directory (or --force)")


def _dir_bytes(path: Path) -> int:
    """Total size of the files in ``path``."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_compressed_tensors(model: torch.nn.Module, qstate: dict[str, LayerQState],
                             out_dir: Path, *, tokenizer_dir: Path | None = None,
                             metadata: dict[str, str | int | float] | None = None
                             ) -> dict[str, Any]:
    """Write ``model`` with ``qstate``'s layers compressed as a compressed-tensors checkpoint.

    Every layer is checked (``check_exportable``) before anything is written; the directory is
    built beside ``out_dir`` and moved into place at the end.

    Args:
        model: the HF causal LM (its unquantized tensors are written as they are).
        qstate: quantization state per layer, keyed by dotted names in ``model``.
        out_dir: the checkpoint directory; must be absent or empty.
        tokenizer_dir: a directory whose tokenizer files are copied alongside.
        metadata: provenance (run key, method, format, qbench version, metrics): written into
            the safetensors header (keys prefixed ``qbench.``, values as strings) and as the
            ``qbench`` object of config.json.

    Returns:
        ``{"path", "n_quantized", "format" (qbench labels), "ct_format", "schemes"
        (description -> layer count), "bytes"}``.

    Example::

        write_compressed_tensors(model, result.qstate, Path("out/w4g64"),
                                 tokenizer_dir=Path(model_dir), metadata={"method": "gptq"})
    """
    from safetensors.torch import save_file

    schemes = check_exportable(qstate)
    _check_layers(model, qstate)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    plans = {name: _plan(qs) for name, qs in qstate.items()}
    qconfig = _quantization_config(model, plans)
    _check_targets(model, qconfig, plans)
    metadata = dict(metadata or {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        header = {"format": "pt", **{f"qbench.{k.removeprefix('qbench.')}": str(v)
                                     for k, v in metadata.items()}}
        save_file(_checkpoint(model, qstate, plans), tmp / WEIGHTS_NAME, metadata=header)
        _write_config(model, qconfig, tmp, metadata)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts: dict[str, int] = {}
    for desc in schemes.values():
        counts[desc] = counts.get(desc, 0) + 1
    return {"path": str(out_dir), "n_quantized": len(qstate),
            "format": ",".join(sorted({qs.fmt.label() for qs in qstate.values()})),
            "ct_format": CT_FORMAT, "schemes": counts, "bytes": _dir_bytes(out_dir)}


# --- reading back --------------------------------------------------------------------------


def _scheme_for(name: str, qconfig: Any) -> Any:
    """The config group scheme of layer ``name``: by name or regex first, then ``Linear``."""
    from compressed_tensors.utils.match import match_name

    groups = list(qconfig.config_groups.values())
    for group in groups:
        if any(match_name(name, t) for t in group.targets):
            return group
    for group in groups:
        if "Linear" in group.targets:
            return group
    raise DataError(f"compressed-tensors checkpoint: no config group targets layer {name!r}")


def _read_layer(tensors: dict[str, torch.Tensor], args: Any) -> QStateTuple:
    """One layer's compressed tensors back in qbench's convention."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, mid = args.num_bits, _mid(args.num_bits)
    shape = torch.Size(tensors["weight_shape"].tolist())
    codes = (unpack_from_int32(tensors["weight_packed"], bits, shape).to(torch.int16) + mid)
    scale = tensors["weight_scale"].float()
    scale = scale.reshape(1, 1) if args.strategy == "tensor" else scale
    if args.symmetric:
        zero = torch.full_like(scale, float(mid))
    elif args.strategy == "tensor":
        zero = (tensors["weight_zero_point"].float() + mid).reshape(1, 1)
    else:
        zp = unpack_from_int32(tensors["weight_zero_point"], bits, scale.shape, packed_dim=0)
        zero = zp.float() + mid
    return codes.to(torch.uint8), scale, zero, tensors.get("weight_g_idx")


def read_qstate(out_dir: Path) -> dict[str, QStateTuple]:
    """Unpack an exported checkpoint's quantized layers to qbench's convention.

    Returns:
        layer name -> ``(codes uint8 (rows, cols) in 0..2^b-1, scale float32 (rows, groups)
        or (1, 1), zero float32 like scale (2^(b-1) for symmetric), g_idx or None)``.
    """
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    state = load_file(out_dir / WEIGHTS_NAME)
    names = [k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed")]
    out = {}
    for name in names:
        local = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
        out[name] = _read_layer(local, _scheme_for(name, qconfig).weights)
    return out
