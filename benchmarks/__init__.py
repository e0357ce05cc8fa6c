"""Benchmarks and experiment scripts; run each from the checkout's root as `python -m benchmarks.<name>`."""
