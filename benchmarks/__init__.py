"""Benchmarks of the harness against plain loops (see run.py)."""
