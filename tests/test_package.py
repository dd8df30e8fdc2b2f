"""The package never imports the references it is tested against."""
import subprocess
import sys


def test_package_imports_neither_torch_nor_transformers():
  modules = ["amd135m", "amd135m.model", "amd135m.sampling", "amd135m.tokenizer",
             "amd135m.checkpoints", "amd135m.convert", "amd135m.generate", "amd135m.config_lib",
             "amd135m.inference", "amd135m.speculative", "amd135m.bench", "amd135m.data.builders",
             "amd135m.data.loader", "amd135m.data.tokenized", "amd135m.data.__main__",
             "amd135m.data.spm"]
  code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"


def test_no_source_file_imports_them_lazily():
  import pathlib
  import re
  pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b", re.M)
  package = pathlib.Path(__file__).resolve().parents[1] / "amd135m"
  offenders = [str(p) for p in package.rglob("*.py") if pattern.search(p.read_text())]
  assert offenders == []


FACES = ["bench", "data.__main__", "draft_head", "evaluate", "reproduce", "spec_eval", "sweep",
         "convert", "generate", "train"]


def test_every_face_is_short():
  """A face parses flags, calls one library function and prints (docs/DESIGN.md): its logic lives
  in the library, where tests, notebooks and the reproduction import it."""
  import pathlib
  package = pathlib.Path(__file__).resolve().parents[1] / "amd135m"
  lengths = {name: len((package / (name.replace(".", "/") + ".py")).read_text().splitlines())
             for name in FACES}
  assert all(n <= 120 for n in lengths.values()), lengths


def test_every_face_reports_a_usage_mistake_in_one_line(capsys):
  """An unknown or malformed flag is bad input like any other: one line and exit 2."""
  import importlib

  import pytest
  for name in FACES:
    module = importlib.import_module(f"amd135m.{name}")
    with pytest.raises(SystemExit) as exit_:
      module.main(["--no-such-flag"])
    err = capsys.readouterr().err
    prog = "amd135m." + name.split(".")[0]
    assert exit_.value.code == 2, name
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), (name, err)
    assert "--help" in err
