"""Benchmark support: two-process pinned harness, the FIFO suite.

Nothing here is imported by the runtime package; ``vmsgamp bench`` and
``bench/compare_fifo.py`` use it.
"""
