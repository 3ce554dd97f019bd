"""Benchmarks that reproduce the seed paper's tables on this project's data (``python -m bench.paper_tables``)."""
