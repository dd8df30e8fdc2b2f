"""The one exception type for mistakes a user can fix; faces print it as one line."""
import argparse
import json
import os
import pathlib
import tempfile


class UserError(Exception):
  """Bad input from the user: the message says what is wrong and what to do."""


def jsonl_records(path, flag: str):
  """(where, record) for each non-blank line of a JSON Lines file, where = 'PATH:LINE'; a
  UserError naming the line for bad JSON, or `flag` for a file that cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          # Parsed one line at a time, so e.lineno is always 1: report the file's line number.
          raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        yield f"{path}:{number}", record
  except OSError as e:
    raise UserError(f"cannot read {flag}: {e.strerror}: {path}") from e
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason})") from e


def check_counts(**counts) -> None:
  """A UserError for the first count below 1: check_counts(batch_size=n) names --batch-size.
  None means unset and passes."""
  for name, value in counts.items():
    if value is not None and value < 1:
      raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def make_dir(path, flag: str):
  """mkdir -p path, or a UserError naming the flag that gave it (a file in the way, no permission,
  a read-only place). Returns the path as a pathlib.Path."""
  path = pathlib.Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag} {path}: a file is in the way; choose a directory path")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    raise UserError(f"{flag} {path}: cannot create this directory: {reason}{where}; "
                    "choose a writable directory path") from None
  return path


def check_dir_creatable(path, flag: str) -> None:
  """make_dir's checks without creating anything: for output a long run writes at its end."""
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag} {path}: a file is in the way; choose a directory path")
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise UserError(f"{flag} {path}: cannot be created ({existing} is a file); "
                    "choose a writable directory path")
  try:  # a real try (permissions, read-only or virtual file systems), removed at once
    os.rmdir(tempfile.mkdtemp(prefix=".amd135m-check-", dir=existing))
  except OSError as e:
    raise UserError(f"{flag} {path}: cannot be created in {existing} ({e.strerror}); "
                    "choose a writable directory path") from None


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with a usage mistake reported like every other bad input: one line, exit 2 (the
  full usage stays one --help away)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message}; --help lists the flags\n")
