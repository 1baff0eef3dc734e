"""xnatio benchmark harness (not part of the package): see benchmarks/run.py."""
