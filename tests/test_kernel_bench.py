"""The kernel table's bookkeeping (suite/kernels/bench.py) on a tiny shape: every group of
timings is bracketed by bandwidth probes and each row's fractions use the right readings."""

from __future__ import annotations

import pytest

from suite.kernels import bench
from suite.primitives import WeightFormat


class FakeProbe(bench.BandwidthProbe):
    """Readings 10, 20, 30, ... GB/s in call order (a real probe takes seconds)."""

    def __call__(self, min_run_time: float = 0.3) -> float:
        self.readings.append(10e9 * (len(self.readings) + 1))
        return self.readings[-1]


def test_rows_carry_the_bandwidth_measured_around_them() -> None:
    probe = FakeProbe()
    fmts = [WeightFormat(4, 32), WeightFormat(2, 64)]
    rows = bench.bench_rows({"t": (32, 128)}, fmts, (1,), probe, min_run_time=0.01)
    bench.against_peak(rows, probe.peak)
    assert len(probe.readings) == 1 + 1 + len(fmts)  # before, after dense, after each format
    groups = [[r for r in rows if r["backend"] == "dense"]]
    groups += [[r for r in rows if r["format"] == f.label()] for f in fmts]
    for i, group in enumerate(groups):  # group i sits between readings i and i + 1
        assert group and all(r["read_bw_local_GBps"] == 10.0 * (i + 2) for r in group)
    for r in rows:
        assert r["read_bw_GBps"] == probe.peak / 1e9
        if r["status"] == "ok":
            assert r["fraction_of_local_bw"] == pytest.approx(
                r["achieved_GBps"] / r["read_bw_local_GBps"])
            assert r["fraction_of_read_bw"] == pytest.approx(r["achieved_GBps"] / 40.0)
    assert set(bench.COLUMNS) >= set().union(*rows)  # the table's columns cover every key


def test_bandwidth_probe_keeps_its_readings() -> None:
    probe = bench.BandwidthProbe(1 << 22)
    a, b = probe(0.01), probe(0.01)
    assert probe.readings == [a, b] and probe.peak == max(a, b) > 0


def test_ladder_rounds_are_interleaved_and_compared_per_round() -> None:
    probe = FakeProbe()
    rows = bench.ladder_rows(32, 128, probe, rounds=3, min_run_time=0.01)
    assert [r["format"] for r in rows] == ["fp32"] + [f.label() for f in bench.LADDER]
    assert len(probe.readings) == 4  # one before the first round, one after each
    by = {r["format"]: r for r in rows}
    ref = by[bench.LADDER[0].label()]
    assert ref["time_ratio_to_ref"] == 1.0 and ref["rounds_faster_than_ref"] == 0
    for r in rows:
        assert r["rounds"] == 3 and r["min_us"] <= r["median_us"] <= r["max_us"]
        assert 0 <= r["rounds_faster_than_ref"] <= 3 and r["speedup_vs_fp32"] > 0
    assert by["fp32"]["backend"] == "dense" and by["fp32"]["speedup_vs_fp32"] == 1.0
