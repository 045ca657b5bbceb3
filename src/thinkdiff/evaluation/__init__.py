"""Benchmark harnesses. ``thinkdiff.evaluation.cobsat``: the CoBSAT in-context generation benchmark."""
