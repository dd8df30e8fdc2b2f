"""Plain-text tables for the terminal and the logs: one cell format, one column alignment."""


def cell(value, spec: str = "") -> str:
  """`value` formatted by `spec`; None as "-", a bool as "yes" or "NO" (what a reader scans for)."""
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "NO"
  return format(value, spec)


def aligned(header: list[str], rows: list[list[str]]) -> str:
  """The header, a rule, then the rows: columns right-aligned to their widest cell."""
  widths = [max(len(c) for c in column) for column in zip(header, *rows)]
  text = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
  text.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(text)
