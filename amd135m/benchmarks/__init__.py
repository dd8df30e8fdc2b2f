"""Benchmark logic behind `python -m amd135m.bench SUBCOMMAND` (the face is amd135m/bench.py)."""
