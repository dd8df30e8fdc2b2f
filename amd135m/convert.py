"""Convert a Hugging Face Llama directory or a llama GGUF into a Hugging Face directory.

  python -m amd135m.convert --input model.gguf --output out_dir [--dtype bfloat16]

Tensors stream one at a time, so memory stays near one tensor whatever the model's size, and the
output directory appears only once complete.
"""
import sys

import tqdm

from amd135m.checkpoints import DTYPES, convert_checkpoint
from amd135m.errors import ArgumentParser, UserError


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="amd135m.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help="Hugging Face model directory or .gguf file")
  parser.add_argument("--output", required=True, help="directory to create (must not exist)")
  parser.add_argument("--dtype", choices=list(DTYPES),
                      help="cast every tensor (default: keep stored dtypes; "
                           "quantised GGUF -> float32)")
  args = parser.parse_args(argv)

  def progress(tensors, total):
    return tqdm.tqdm(tensors, total=total, unit="tensor", file=sys.stderr, leave=False)

  try:
    summary = convert_checkpoint(args.input, args.output, dtype=args.dtype, progress=progress)
  except UserError as e:
    print(f"amd135m.convert: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("amd135m.convert: interrupted; nothing was written", file=sys.stderr)
    return 130
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
