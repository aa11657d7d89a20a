"""The kernel table's bookkeeping (suite/kernels/bench.py) on a tiny shape: every block of a
timing sits between two quick bandwidth readings and each row's fractions use the right
readings."""

from __future__ import annotations

import pytest
import torch

from suite.kernels import bench, cpu
from suite.kernels.packing import from_qstate
from suite.primitives import WeightFormat, quantize_tensor


class FakeProbe(bench.BandwidthProbe):
    """Full readings 1, 2, 3, ... GB/s and quick readings 10, 20, 30, ... GB/s in call order
    (a real full reading takes seconds)."""

    def __call__(self, min_run_time: float = 0.3) -> float:
        self.readings.append(1e9 * (len(self.readings) + 1))
        return self.readings[-1]

    def quick(self) -> float:
        self.quick_readings.append(10e9 * (len(self.quick_readings) + 1))
        return self.quick_readings[-1]


def test_rows_carry_the_bandwidth_read_around_their_blocks() -> None:
    probe, blocks = FakeProbe(), 2
    fmts = [WeightFormat(4, 32), WeightFormat(2, 64)]
    rows = bench.bench_rows({"t": (32, 128)}, fmts, (1,), probe, blocks=blocks, block_s=1e-3)
    probe(), probe()
    bench.against_peak(rows, probe.peak)
    timed = [r for r in rows if r["status"] == "ok"]
    assert {"dense"} < {r["backend"] for r in timed}
    assert len(probe.quick_readings) == len(timed) * (blocks + 1)
    for i, r in enumerate(timed):  # readings n, n+1, n+2 (n = 3 i + 1): blocks see n+1, n+2
        assert r["read_bw_local_GBps"] == 10.0 * (3 * i + 2)  # the lower middle of the two
        assert r["read_bw_GBps"] == 2.0 and r["fraction_of_read_bw"] == pytest.approx(
            r["achieved_GBps"] / 2.0)
        assert r["fraction_of_local_bw"] > 0
        assert r["read_same_bytes_us"] > 0 and r["fraction_of_same_bytes_read"] > 0
    assert set(bench.COLUMNS) >= set().union(*rows)  # the table's columns cover every key


def test_only_gemv_rows_are_paired_with_a_read_of_the_same_bytes() -> None:
    probe = FakeProbe()
    rows = bench.bench_rows({"t": (32, 128)}, [WeightFormat(4, 32)], (1, 2), probe, blocks=1,
                            block_s=1e-3)
    for r in rows:
        assert ("fraction_of_same_bytes_read" in r) == (r["M"] == 1)


def test_same_bytes_reads_stream_the_weight_size() -> None:
    fns = bench.same_bytes_reads(1000)  # rounded down to 896 bytes, rotated so no cache holds
    assert len(fns) == bench.copies_for(896) and all(f() is not None for f in fns[:2])
    assert len(bench.same_bytes_reads(10)) == bench.copies_for(128)  # at least 128 bytes


def test_paired_fractions_are_per_block() -> None:
    p = bench.Paired(times=[1e-3, 4e-3, 2e-3], bandwidths=[10e9, 5e9, 20e9])
    assert p.fractions(10**7).tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert p.timing().median == 2e-3 and p.timing().iqr == pytest.approx(1.5e-3)
    p = bench.Paired(times=[1e-3, 4e-3], bandwidths=[1.0, 1.0], reads=[5e-4, 3e-3])
    assert p.of_same_bytes().tolist() == pytest.approx([0.5, 0.75])


def test_time_paired_rotates_across_blocks() -> None:
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(5)]
    probe = FakeProbe()
    p = bench.time_paired(fns, probe, blocks=6, block_s=0.0)  # one call per block
    assert len(p.times) == 6 and len(probe.quick_readings) == 7
    assert p.bandwidths == [20e9, 30e9, 40e9, 50e9, 60e9, 70e9]  # the better of the two around
    assert calls == [0, 1, 2, 3, 4, 0, 1]  # warm-up, then every call on the next copy
    assert p.reads == []


def test_time_paired_reads_the_same_bytes_after_each_block() -> None:
    order: list[str] = []
    probe = FakeProbe()
    quick = probe.quick
    probe.quick = lambda: order.append("q") or quick()  # type: ignore[method-assign]
    p = bench.time_paired([lambda: order.append("k")], probe, blocks=3, block_s=0.0,
                          reads=[lambda: order.append("r")])
    assert len(p.reads) == 3 and all(r > 0 for r in p.reads)
    assert "".join(order) == "kr" + "q" + "krq" * 3  # warm-ups, reading, then block, read, reading


def test_bandwidth_probe_keeps_its_readings() -> None:
    probe = bench.BandwidthProbe(1 << 22)
    a, b = probe(0.01), probe(0.01)
    q = probe.quick()
    assert probe.readings == [a, b] and probe.peak == max(a, b) > 0
    assert probe.quick_readings == [q] and q > 0


def test_ladder_rounds_are_interleaved_and_compared_per_round() -> None:
    probe = FakeProbe()
    rows = bench.ladder_rows(32, 128, probe, rounds=3, block_s=1e-3, also=())
    assert [r["format"] for r in rows] == ["fp32"] + [f.label() for f in bench.LADDER]
    assert len(probe.quick_readings) == 1 + 3 * len(rows)  # one before, one after each block
    by = {r["format"]: r for r in rows}
    ref = by[bench.LADDER[0].label()]
    assert ref["time_ratio_to_ref"] == 1.0 and ref["rounds_faster_than_ref"] == 0
    for j, r in enumerate(rows):  # entry j of round k sits between readings 4k+j+1, 4k+j+2
        assert r["rounds"] == 3 and r["min_us"] <= r["median_us"] <= r["max_us"]
        assert 0 <= r["rounds_faster_than_ref"] <= 3 and r["speedup_vs_fp32"] > 0
        assert r["read_bw_local_GBps"] == 10.0 * (4 * 1 + j + 2)  # the middle round's
        assert r["fraction_of_local_bw"] > 0 and r["fraction_of_local_bw_fast"] > 0
        assert r["read_same_bytes_us"] > 0 and r["fraction_of_same_bytes_read"] > 0
    assert by["fp32"]["backend"] == "dense" and by["fp32"]["speedup_vs_fp32"] == 1.0



@pytest.mark.skipif(not cpu.supports("cpp-a8", from_qstate(quantize_tensor(
    torch.randn(32, 128), WeightFormat(4, 64)))), reason="cpp-a8 needs the AVX2 build")
def test_ladder_times_the_a8_backend_as_its_own_named_entries() -> None:
    """Each format also gets a cpp-a8 entry (int8 activations: not weight-only), named by its
    backend in the row, so it is never read as the weight-only kernel's speed."""
    rows = bench.ladder_rows(32, 128, FakeProbe(), rounds=2, block_s=1e-3)
    a8 = [r for r in rows if r["backend"] == "cpp-a8"]
    assert [r["format"] for r in a8] == [f.label() for f in bench.LADDER]
    assert len(rows) == 1 + 2 * len(bench.LADDER)
