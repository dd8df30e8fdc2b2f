"""python -m amd135m.reproduce (or experiments/reproduce.py) [--preset demo|full|test] [--out DIR]
    [--target PATH]

The AMD-135M workflow at CPU scale (amd135m.benchmarks.reproduction): pretrain a small draft on
Gutenberg, fine-tune it on Python, train a feature head on the target's hidden states, then AMD's
table on HumanEval prompts with the real SmolLM2-135M as the target, each draft beside the n-gram
draft and the target's own int8 and int4 copies. Every stage is skipped when already complete,
so a rerun resumes where a crash stopped. `make demo` runs --preset demo; `make reproduce`
--preset full.
"""
import argparse
import sys

from amd135m import compilation_cache, config_lib
from amd135m.benchmarks import reproduction
from amd135m.errors import ArgumentParser, UserError


def main(argv=None) -> int:
  parser = ArgumentParser(prog="amd135m.reproduce", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="demo", choices=sorted(reproduction.PRESETS))
  parser.add_argument("--out", default=None, help="default: ~/.cache/amd135m/reproduce/PRESET")
  parser.add_argument("--target", default=None, help="default: the SmolLM2-135M GGUF")
  args = parser.parse_args(argv)
  compilation_cache.enable()
  out = args.out or config_lib.cache_path("reproduce", args.preset)
  try:
    reproduction.reproduce(out, args.preset, args.target)
  except UserError as e:
    print(f"amd135m.reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
