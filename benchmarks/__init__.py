"""Benchmarks and reports; run each as a module from the repository root (python -m benchmarks.NAME)."""
