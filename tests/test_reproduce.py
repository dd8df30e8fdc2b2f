"""The CPU reproduction of AMD-135M's workflow, shortened, from an empty output directory."""
import json

from amd135m import reproduce
from amd135m.benchmarks import reproduction


def test_shortened_reproduction_runs_end_to_end(tmp_path, smollm2_slice):
  """Every stage on SmolLM2's first 2 layers as the target: the stages, files, table and rerun are
  what is checked here; greedy exactness on the whole SmolLM2 has tests of its own per draft
  (test_speculative, test_feature_draft), and `make demo` runs this on the whole model."""
  lines = []
  summary = reproduction.reproduce(tmp_path / "out", "test", str(smollm2_slice), log=lines.append)
  out = tmp_path / "out"
  for stage in ("pretrain", "code", "distill"):
    assert (out / stage / "COMPLETE").exists(), stage
  # The distillation text is the target's own continuation of stdlib headers, never HumanEval.
  texts = [p.read_text() for p in sorted((out / "distill_raw").glob("*.txt"))]
  assert texts and all(t.startswith("def ") for t in texts)
  assert not any("HumanEval" in t for t in texts)
  assert (out / "head" / "COMPLETE").exists()
  rows = summary["rows"]
  assert {r["setting"] for r in rows} == {"greedy", "sampling"}
  assert [r["draft"] for r in rows] == [d for d in ("n-gram", "AMD-style draft", "feature head",
                                                       "lookup + head") for _ in range(2)]
  for row in rows:
    assert 0.0 <= row["acceptance"] <= 1.0 and row["speedup"] > 0
  # Greedy speculative output equals target-only greedy output.
  assert all(r["exact"] for r in rows if r["setting"] == "greedy")
  saved = json.loads((out / "summary.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert (out / "loss_curves.png").stat().st_size > 10_000
  for name in ("n_gram", "amd_style_draft", "feature_head", "lookup_and_head"):
    assert (out / "table" / name / "spec_table.csv").exists(), name
  assert (out / "comparison.png").stat().st_size > 10_000
  comparison = lines[-2]  # the last table: one line per (setting, draft), target-only first
  assert comparison.count("target only") == 2 and comparison.count("feature head") == 2

  # A rerun finds every stage complete and redoes nothing: no file of a stage or of the table is
  # rewritten (the summary and the loss plot are redrawn from them), and the rows carry over.
  def stamps():
    return {p: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("summary.json", "loss_curves.png",
                                              "comparison.png")}
  before = stamps()
  lines.clear()
  again = reproduction.reproduce(out, "test", str(smollm2_slice), log=lines.append)
  # pretrain, code, distill, head, and the four drafts' tables
  assert sum("skipped" in line for line in lines) == 8
  assert stamps() == before
  assert again["rows"] == saved["rows"]


def test_bad_target_or_out_is_one_line_before_any_stage(tmp_path, smollm2_gguf, capsys):
  truncated = tmp_path / "truncated.gguf"
  with open(smollm2_gguf, "rb") as src:
    truncated.write_bytes(src.read(1 << 20))  # ends inside the header's metadata
  (tmp_path / "a_file").write_text("")
  for args, message in [
      (["--target", str(truncated), "--out", str(tmp_path / "o1")], "truncated"),
      (["--out", str(tmp_path / "a_file" / "o2"), "--target", str(smollm2_gguf)],
       "cannot create this directory")]:
    assert reproduce.main(["--preset", "test", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amd135m.reproduce: error: "), err
    assert message in err, err
  assert not (tmp_path / "o1").exists()  # nothing trained
