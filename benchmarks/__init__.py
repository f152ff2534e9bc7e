"""Benchmarks: `python -m benchmarks.run SUITE` (one module per suite in this folder)."""
