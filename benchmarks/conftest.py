"""Benchmarks run on the CPU threads pytest sees; nothing here is a unit test."""
