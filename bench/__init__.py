"""Benchmarks run by `make bench` (`python -m bench.run`): data plane, operator, operations."""
