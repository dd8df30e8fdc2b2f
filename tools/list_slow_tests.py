"""Writes tests/slow_tests.txt, the tests `make test-fast` skips, from a pytest log made with
`--durations=0`: every test function whose setup, call and teardown took more than --seconds
(summed over its parametrizations). The suite marks the listed functions `slow` (conftest.py).

python tools/list_slow_tests.py LOG [--seconds 3]
"""
import argparse
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(\S+)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log", type=pathlib.Path)
  parser.add_argument("--seconds", type=float, default=3.0)
  args = parser.parse_args()
  seconds = collections.Counter()
  for line in args.log.read_text(errors="replace").splitlines():
    match = LINE.match(line)
    if match:
      seconds[match.group(2).split("[")[0]] += float(match.group(1))
  slow = sorted(name for name, s in seconds.items() if s > args.seconds)
  header = (f"# Test functions over {args.seconds:g} s (setup + call + teardown, all parameters)"
            f" in a `pytest --durations=0` log;\n# regenerate: python tools/list_slow_tests.py "
            f"LOG. `make test-fast` skips them.\n")
  (ROOT / "tests" / "slow_tests.txt").write_text(header + "\n".join(slow) + "\n")
  fast = sum(s for s in seconds.values() if s <= args.seconds)
  print(f"{len(slow)} slow of {len(seconds)} functions; the rest took {fast:.0f} s in that log")


if __name__ == "__main__":
  main()
