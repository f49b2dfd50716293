"""Evaluation: metrics, the benchmark runner, and test-time scaling."""
