"""Benchmarks: scripts that print numbers (run with ``python -m bench.<name>``), not tests."""
