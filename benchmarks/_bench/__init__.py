"""Helpers of benchmarks/run.py (timing, cases, peers, end to end, report)."""
