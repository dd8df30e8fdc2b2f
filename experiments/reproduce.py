"""python experiments/reproduce.py [--preset demo|full|test] [--out DIR] [--target PATH]

The CPU reproduction of AMD-135M's workflow (amd135m/reproduce.py): pretrain a draft on
Gutenberg, fine-tune it on Python, distil the target's completions, then AMD's table on HumanEval
with the real SmolLM2-135M as the target. `make demo` runs --preset demo; `make reproduce` --preset
full.
"""
import argparse
import sys

from amd135m import reproduce
from amd135m.errors import UserError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="demo", choices=sorted(reproduce.PRESETS))
  parser.add_argument("--out", default=None, help="default: ~/.cache/amd135m/reproduce/PRESET")
  parser.add_argument("--target", default=None, help="default: the SmolLM2-135M GGUF")
  args = parser.parse_args(argv)
  out = args.out or reproduce.config_lib.cache_path("reproduce", args.preset)
  try:
    reproduce.reproduce(out, args.preset, args.target)
  except UserError as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
