"""python experiments/reproduce.py [--preset demo|full|test] [--out DIR] [--target PATH]

The CPU reproduction of AMD-135M's workflow (amd135m/benchmarks/reproduction.py, also `python -m
amd135m.reproduce`): pretrain a draft on Gutenberg, fine-tune it on Python, distil the target's
completions, then AMD's table on HumanEval with the real SmolLM2-135M as the target. `make demo`
runs --preset demo; `make reproduce` --preset full.
"""
import sys

from amd135m import reproduce

if __name__ == "__main__":
  sys.exit(reproduce.main())
