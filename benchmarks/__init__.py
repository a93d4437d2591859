"""Benchmarks of distcomp; run each as a script, e.g. ``python benchmarks/hook_overhead.py``."""
