"""Benchmarks: they measure speed, bytes and quality and write what they found to docs/benchmarks.md."""
