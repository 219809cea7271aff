"""Benchmarks: speed, bytes and quality, written with their commands to docs/benchmarks.md."""
