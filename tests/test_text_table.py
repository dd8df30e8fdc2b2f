"""The plain-text tables every command prints."""
from amd135m import text_table


def test_cells_mark_missing_and_failed_values_and_columns_align():
  assert [text_table.cell(v, ".2f") for v in (None, True, False, 1.234)] == ["-", "yes", "NO",
                                                                            "1.23"]
  lines = text_table.aligned(["draft", "speedup"], [["n-gram", "1.20x"], ["int8", "10.31x"]])
  header, rule, *rows = lines.splitlines()
  assert rule == "-------+--------"
  assert rows == ["n-gram |   1.20x", "  int8 |  10.31x"]
  assert {len(line) for line in lines.splitlines()} == {len(header)}
