"""Benchmarks beside the product (not in the wheel): python -m bench.infer, python -m bench.train."""
