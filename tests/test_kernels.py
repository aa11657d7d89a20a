"""Packed kernels: packing is lossless, the kernel view is exactly the layer state's weight, and
every backend's output equals the fake-quant product (dequantize, then matmul) within a stated
tolerance, for every bit width, group kind, zero kind, act-order permutation, outlier channel
and odd shape."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from gpu_cases import special_states

from suite.kernels import cpu
from suite.kernels.packing import from_qstate, pack_rows, unpack_rows
from suite.primitives import PER_CHANNEL, PER_TENSOR, LayerQState, WeightFormat, quantize_tensor


@pytest.mark.parametrize(("bits", "cols"), list(itertools.product(range(2, 9), (8, 13, 64))))
def test_pack_rows_round_trips_densely(bits: int, cols: int) -> None:
    g = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.shape == (5, -(-cols * bits // 8))  # ceil(cols * bits / 8) bytes per row
    assert torch.equal(unpack_rows(packed, bits, cols), codes)


def _states() -> list[tuple[str, LayerQState]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for bits, gs, sym, (rows, cols) in itertools.product(
            (2, 3, 4, 8), (32, 64, PER_CHANNEL, PER_TENSOR), (False, True),
            ((48, 256), (17, 96))):
        if gs > 0 and cols % gs:
            continue
        w = torch.randn(rows, cols, generator=g)
        fmt = WeightFormat(bits, gs, sym)
        out.append((f"w{bits}-{fmt.label()}-{rows}x{cols}", quantize_tensor(w, fmt)))
    return out


STATES = _states()


ALL = STATES + special_states()


@pytest.mark.parametrize(("name", "qs"), ALL, ids=[n for n, _ in ALL])
def test_kernel_view_is_exactly_the_state(name: str, qs: LayerQState) -> None:
    kw = from_qstate(qs)
    torch.testing.assert_close(kw.dequantize(), qs.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "qs"), ALL, ids=[n for n, _ in ALL])
@pytest.mark.parametrize("m", [1, 16])
def test_every_supporting_backend_matches_fake_quant(name: str, qs: LayerQState, m: int) -> None:
    kw = from_qstate(qs)
    x = torch.randn(m, kw.cols, generator=torch.Generator().manual_seed(m))
    ref = x @ qs.dequantize().t()
    ran = []
    for backend in cpu.BACKENDS:
        if not cpu.supports(backend, kw):
            continue
        err = (cpu.prepare(kw, backend)(x) - ref).abs()
        allowed = cpu.allowed_error(kw, backend, x, ref)
        assert bool((err <= allowed).all()), (backend, float((err / allowed).max()))
        ran.append(backend)
    assert "reference" in ran
    if kw.bits == 4 and kw.group in (32, 64) and kw.rows % 16 == 0:
        assert "torch-int4" in ran
    if kw.cols % 64 == 0 and kw.group % 32 == 0 and cpu.cpp_module() is not None:
        assert "cpp-i16" in ran
        if kw.bits in (2, 3, 4) and kw.rows % 16 == 0:
            assert "cpp-lut" in ran
            assert ("cpp-vnni" in ran) == cpu.cpp_module().has_vnni()


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_cpp_kernel_builds_where_a_compiler_exists() -> None:
    """With a compiler the C++ backend must build (and is then checked above)."""
    assert cpu.cpp_module() is not None


def test_packed_linear_replaces_a_linear() -> None:
    lin = torch.nn.Linear(128, 48)
    qs = quantize_tensor(lin.weight.detach(), WeightFormat(4, 32))
    packed = cpu.PackedLinear(from_qstate(qs), lin.bias)
    x = torch.randn(2, 5, 128)
    ref = torch.nn.functional.linear(x, qs.dequantize(), lin.bias)
    x2 = x.reshape(10, 128)
    allowed = cpu.allowed_error(packed.weight_packed, packed.backend, x2,
                                x2 @ qs.dequantize().t()).reshape(2, 5, 48)
    assert bool(((packed(x) - ref).abs() <= allowed + 1e-6).all())
    assert packed.backend == cpu.select(packed.weight_packed)
    first = next(b for b in ("cpp-vnni", "cpp-lut") if cpu.supports(b, packed.weight_packed)
                 or b == "cpp-lut")
    assert cpu.supports(first, packed.weight_packed) <= (packed.backend == first)
    assert "bits=4" in repr(packed)
    with pytest.raises(ValueError, match="backend: got 'gpu'"):
        cpu.PackedLinear(from_qstate(qs), backend="gpu")


def test_packed_bytes_are_what_the_format_promises() -> None:
    qs = quantize_tensor(torch.randn(64, 256), WeightFormat(3, 64))
    kw = from_qstate(qs)
    assert kw.packed.numel() == 64 * 256 * 3 // 8  # dense 3-bit codes
    assert kw.nbytes() == 64 * 96 + 4 * 64 * 4 + 64 * 4  # codes + float32 scale + uint8 zero
    floaty = from_qstate(LayerQState(qs.codes, qs.scale, qs.zero + 0.5, qs.fmt, zero_kind="float"))
    assert floaty.zero is None and floaty.nbytes() == 64 * 96 + 2 * 4 * 64 * 4  # float offsets


needs_i16 = pytest.mark.skipif(not cpu.supports("cpp-i16", from_qstate(
    quantize_tensor(torch.randn(4, 64), WeightFormat(4, 32)))), reason="no AVX2 C++ kernel")
_W16 = from_qstate(quantize_tensor(torch.randn(16, 64), WeightFormat(4, 32)))
BLOCKED = [pytest.param(b, marks=pytest.mark.skipif(not cpu.supports(b, _W16),
                                                    reason=f"{b}: instruction set not compiled"))
           for b in ("cpp-lut", "cpp-vnni")]  # the 16-row-block kernels (AVX2, AVX-512 VNNI)


@needs_i16
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpp_i16_storage_and_bytes(bits: int) -> None:
    """The integer kernel reads dense codes, float32 scales and uint8 zero points, and its
    bytes are counted from those tensors."""
    kw = from_qstate(quantize_tensor(torch.randn(32, 256), WeightFormat(bits, 64)))
    k = cpu.prepare(kw, "cpp-i16")
    assert k.tensors["units"].numel() == 32 * 256 * bits // 8
    assert k.tensors["zero"].dtype == torch.uint8
    assert k.nbytes() == kw.nbytes() == 32 * 256 * bits // 8 + 32 * 4 * (4 + 1)


@needs_i16
@pytest.mark.parametrize(("backend", "storage", "levels"), [
    ("cpp-i16", "units", cpu.X_LEVELS), ("cpp-lut", "lut", cpu.LUT_LEVELS),
    pytest.param("cpp-vnni", "vnni", cpu.LUT_LEVELS, marks=BLOCKED[1].marks)])
def test_rounding_error_bound_is_tight_and_a_wrong_kernel_fails(backend: str, storage: str,
                                                                 levels: int) -> None:
    """The stated bound is not vacuous (within 20x of the observed error, < 1e-3 of the
    output for 16-bit activations, 4x that for the 14-bit of cpp-lut and cpp-vnni) and a
    one-code corruption of the storage breaks it."""
    g = torch.Generator().manual_seed(3)
    qs = quantize_tensor(torch.randn(64, 512, generator=g), WeightFormat(4, 64))
    kw = from_qstate(qs)
    x = torch.randn(4, 512, generator=g)
    ref = x @ qs.dequantize().t()
    k = cpu.prepare(kw, backend)
    err = (k(x) - ref).abs()
    allowed = cpu.allowed_error(kw, backend, x, ref)
    assert bool((err <= allowed).all())
    assert float(allowed.max()) < 1e-3 * cpu.X_LEVELS / levels * float(ref.abs().max())
    assert float(allowed.max()) < 20 * float(err.max())
    bad = k.clone()
    bad.tensors[storage][1, 7] ^= 0x11  # two codes (or code bits) of one row changed
    assert not bool(((bad(x) - ref).abs() <= allowed).all())
    assert bool(((k(x) - ref).abs() <= allowed).all())  # the clone did not touch the original


@needs_i16
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, PER_CHANNEL])
def test_cpp_i16_large_m_path_is_the_dequantized_gemm(bits: int, group: int) -> None:
    """From DENSE_FROM_M rows on, cpp-i16 multiplies float32 tiles of its own storage: the
    tiles are exactly the state's dequantized weight (uint8 zeros and float offsets), and the
    product matches the fake-quant product to float32 summation order, over several tiles."""
    g = torch.Generator().manual_seed(bits)
    cols = 4096 if group == PER_CHANNEL else 1024  # 1024 columns: 256-row tiles, 2 of them
    qs = quantize_tensor(torch.randn(2 * cpu.dense_tile_rows(cols) + 16, cols, generator=g),
                         WeightFormat(bits, group))
    for kw in (from_qstate(qs), from_qstate(LayerQState(qs.codes, qs.scale, qs.zero + 0.25,
                                                        qs.fmt, zero_kind="float"))):
        k = cpu.prepare(kw, "cpp-i16")
        t = k.tensors
        tile = cpu.cpp_module().dequant_int(t["units"], t["scale"], t["zero"], bits, kw.group,
                                            3, kw.rows)
        torch.testing.assert_close(tile, kw.dequantize()[3:], rtol=0, atol=1e-6)
        x = torch.randn(cpu.DENSE_FROM_M, cols, generator=g)
        ref = x @ kw.dequantize().t()
        assert float((k(x) - ref).abs().max()) <= cpu.RTOL * float(ref.abs().max())


@pytest.mark.parametrize("backend", BLOCKED)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_blocked_storage_and_bytes(backend: str, bits: int) -> None:
    """The row-block kernels read b bits per code in blocks of 16 rows, float32 scales and
    uint8 zero points side by side per block, and their bytes are counted from those tensors."""
    kw = from_qstate(quantize_tensor(torch.randn(32, 256), WeightFormat(bits, 64)))
    k = cpu.prepare(kw, backend)
    assert k.tensors[backend[4:]].shape == (2, 256 * 16 * bits // 8)
    assert k.tensors["zero"].dtype == torch.uint8 and k.tensors["scale"].shape == (2, 4, 16)
    assert k.nbytes() == kw.nbytes() == 32 * 256 * bits // 8 + 32 * 4 * (4 + 1)
    torch.testing.assert_close(k.tensors["scale"][1, 2], kw.scale[16:32, 2], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BLOCKED)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, PER_CHANNEL])
def test_blocked_integer_sums_are_exact(backend: str, bits: int, group: int) -> None:
    """With x rounded as the kernel rounds it (per sub-block of lut_segment columns, to
    |X| <= LUT_LEVELS), the kernel's product is the exact product up to float32 summation:
    every table lookup, plane weight and integer sum is exact (and the bound is not hiding a
    wrong index). Several M (cpp-vnni: tiles of 4 rows and the rest one by one), uint8 zeros
    and float offsets."""
    g = torch.Generator().manual_seed(bits + group)
    cols = 1024
    qs = quantize_tensor(torch.randn(48, cols, generator=g), WeightFormat(bits, group))
    seg = cpu.lut_segment(qs.fmt.group_size if group > 0 else cols)
    for kw in (from_qstate(qs), from_qstate(LayerQState(qs.codes, qs.scale, qs.zero + 0.25,
                                                        qs.fmt, zero_kind="float"))):
        k = cpu.prepare(kw, backend)
        for m in (1, 3, 6, 20):
            x = torch.randn(m, cols, generator=g) * torch.rand(1, cols, generator=g) * 4
            xs = x.reshape(m, -1, seg)
            amax = xs.abs().amax(-1, keepdim=True)
            inv = torch.full_like(amax, cpu.LUT_LEVELS) / amax  # the kernel's float32 division
            xr = (torch.round(xs * inv) * (amax / cpu.LUT_LEVELS)).reshape(m, cols)
            ref = (xr.double() @ kw.dequantize().double().t()).float()
            assert float((k(x) - ref).abs().max()) <= cpu.RTOL * float(ref.abs().max()), m


@pytest.mark.skipif(not all(cpu.supports(b, _W16) for b in ("cpp-lut", "cpp-vnni")),
                    reason="cpp-vnni: AVX-512 VNNI not compiled")
def test_blocked_kernels_agree_bit_for_bit() -> None:
    """cpp-lut and cpp-vnni round activations alike and their integer sums are exact, so they
    return the same float32 output (the float epilogue is the same sequence of operations);
    4096 columns exercise the prefetch, 5 rows a tile of 4 and a single row."""
    g = torch.Generator().manual_seed(5)
    for bits, cols in ((2, 512), (3, 512), (4, 512), (4, 4096)):
        qs = quantize_tensor(torch.randn(64, cols, generator=g), WeightFormat(bits, 64))
        kw = from_qstate(qs)
        x = torch.randn(5, cols, generator=g)
        torch.testing.assert_close(cpu.prepare(kw, "cpp-vnni")(x), cpu.prepare(kw, "cpp-lut")(x),
                                   rtol=0, atol=0)


@needs_i16
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, PER_CHANNEL])
def test_a8_is_the_exact_product_with_int8_activations(bits: int, group: int) -> None:
    """cpp-a8 (not weight-only) equals the exact product of the weight with x rounded as it
    rounds it, to int8 per 32 columns (X = round(x / d), d = max |x| / 127), up to float32
    summation: vpdpbusd's int32 sums are exact, and so are vpmaddubsw's int16 pair sums (the
    AVX2 form) for codes of at most 4 bits. Its whole deviation from the weight-only product is
    that rounding."""
    g = torch.Generator().manual_seed(bits * 7 + group)
    cols = 1024
    qs = quantize_tensor(torch.randn(48, cols, generator=g), WeightFormat(bits, group))
    for kw in (from_qstate(qs), from_qstate(LayerQState(qs.codes, qs.scale, qs.zero + 0.25,
                                                        qs.fmt, zero_kind="float"))):
        k = cpu.prepare(kw, "cpp-a8")
        for m in (1, 3, 20):
            x = torch.randn(m, cols, generator=g) * torch.rand(1, cols, generator=g) * 4
            xs = x.reshape(m, -1, cpu.A8_SEGMENT)
            amax = xs.abs().amax(-1, keepdim=True)
            inv = torch.full_like(amax, cpu.A8_LEVELS) / amax
            xr = (torch.round(xs * inv) * (amax / cpu.A8_LEVELS)).reshape(m, cols)
            ref = (xr.double() @ kw.dequantize().double().t()).float()
            assert float((k(x) - ref).abs().max()) <= cpu.RTOL * float(ref.abs().max()), m
    bad = k.clone()  # the fault: two codes of one row changed
    bad.tensors["units"][1, 7] ^= 0x11
    assert float((bad(x) - ref).abs().max()) > cpu.RTOL * float(ref.abs().max())


@needs_i16
@needs_i16
@pytest.mark.slow
def test_a8_inner_product_forms_agree_bit_for_bit() -> None:
    """The build forced to the AVX2 form (-DQBENCH_A8_NO_VNNI) and the default build (vpdpbusd
    where the CPU has AVX-512 VNNI) give identical outputs: the A/B timing of
    benchmarks/ab_a8_dot.py compares the same product. Slow: a second compile."""
    old = cpu.cpp_module(("QBENCH_A8_NO_VNNI",))
    assert old is not None
    g = torch.Generator().manual_seed(5)
    for bits in (2, 3, 4):
        qs = quantize_tensor(torch.randn(64, 512, generator=g), WeightFormat(bits, 64))
        t = cpu.prepare(from_qstate(qs), "cpp-a8").tensors
        x = torch.randn(3, 512, generator=g)
        args = (t["units"], t["scale"], t["zero"], bits, 64)
        assert torch.equal(old.qgemm_a8(x, *args), cpu.cpp_module().qgemm_a8(x, *args)), bits


def test_a8_error_bound_holds_and_is_not_vacuous() -> None:
    """The deviation from the weight-only product stays within ``a8_error_bound`` and the bound
    is within 20x of the observed error (a one-code fault is below it: the exactness test
    above is what catches a wrong a8 kernel)."""
    g = torch.Generator().manual_seed(5)
    qs = quantize_tensor(torch.randn(64, 512, generator=g), WeightFormat(4, 64))
    kw = from_qstate(qs)
    x = torch.randn(4, 512, generator=g)
    ref = x @ qs.dequantize().t()
    err = (cpu.prepare(kw, "cpp-a8")(x) - ref).abs()
    allowed = cpu.allowed_error(kw, "cpp-a8", x, ref)
    assert bool((err <= allowed).all())
    assert float(allowed.max()) < 20 * float(err.max())


def test_a8_takes_rows_in_blocks_of_four() -> None:
    """cpp-a8 stores rows in blocks of 4 (``to_a8``): other row counts go elsewhere, and
    ``to_a8`` only reorders ``to_units``' bytes within a block."""
    codes = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
    units, blocked = cpu.to_units(codes, 4), cpu.to_a8(codes, 4)
    assert torch.equal(units[:4].flatten().sort()[0],
                       blocked[:4].flatten().sort()[0])
    assert torch.equal(blocked[:4].flatten()[32:64], units[1, :32])  # unit 0 of row 1
    kw = from_qstate(quantize_tensor(torch.randn(6, 128), WeightFormat(4, 64)))
    assert not cpu.supports("cpp-a8", kw)


def test_a8_is_never_chosen_automatically() -> None:
    """int8 activations change the format (W4A8), so ``auto`` never picks cpp-a8."""
    kw = from_qstate(quantize_tensor(torch.randn(64, 512), WeightFormat(4, 64)))
    assert "cpp-a8" not in cpu.PREFERENCE and cpu.select(kw) != "cpp-a8"
