"""The one exception type for mistakes a user can fix; faces print it as one line."""
import argparse
import os
import pathlib
import tempfile


class UserError(Exception):
  """Bad input from the user: the message says what is wrong and what to do."""


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
