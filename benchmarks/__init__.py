"""Latency regression suite (``pytest benchmarks``) and its report (``python -m benchmarks.report``)."""
