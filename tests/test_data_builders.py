"""The TFDS builders write array_record from raw files without TensorFlow, and count every skip."""
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from amd135m.data import builders
from amd135m.errors import UserError


def _jsonl_zst(path, records, frames=1):
  """Writes records as jsonl compressed into `frames` concatenated zstd frames."""
  lines = [json.dumps(r).encode() + b"\n" for r in records]
  step = -(-len(lines) // frames)
  compressor = zstandard.ZstdCompressor()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"".join(compressor.compress(b"".join(lines[i:i + step]))
                            for i in range(0, len(lines), step)))


def _slimpajama_record(text, set_name="RedPajamaCommonCrawl"):
  return {"text": text, "meta": {"redpajama_set_name": set_name}}


def _docs(source) -> dict[str, str]:
  return {r["id"].decode(): r["text"].decode() for r in (source[i] for i in range(len(source)))}


def _records(source) -> list[tuple[str, str]]:
  """(id, text) of each record, in the source's order."""
  return [(r["id"].decode(), r["text"].decode()) for r in (source[i] for i in range(len(source)))]


def test_slimpajama_skips_books_and_empty_text_across_frames(tmp_path):
  manual = tmp_path / "raw"
  _jsonl_zst(manual / "chunk1" / "a.jsonl.zst", [
      _slimpajama_record("web page"),
      _slimpajama_record("a whole book", "RedPajamaBook"),
      _slimpajama_record("  "),
      _slimpajama_record("wiki article", "RedPajamaWikipedia"),
  ], frames=3)
  _jsonl_zst(manual / "chunk2" / "b.jsonl.zst",
             [_slimpajama_record("arxiv paper", "RedPajamaArXiv")])
  (manual / "chunk2" / "empty.jsonl.zst").write_bytes(b"")

  stats = builders.prepare("slimpajama", manual, tmp_path / "tfds")

  assert stats["documents"] == 3 and stats["files"] == 3
  assert stats["skipped"] == {"redpajama_book": 1, "empty_text": 1, "empty_file": 1}
  stats_path = tmp_path / "tfds" / "amd135m_slimpajama" / "all" / "1.1.0" / builders.STATS_FILE
  assert json.loads(stats_path.read_text()) == stats
  assert _docs(builders.load("slimpajama", tmp_path / "tfds")) == {
      "chunk1/a.jsonl.zst:0": "web page",
      "chunk1/a.jsonl.zst:3": "wiki article",
      "chunk2/b.jsonl.zst:0": "arxiv paper",
  }
  assert "tensorflow" not in sys.modules  # array_record read and write must not pull TF in.


def test_slimpajama_truncated_file_is_an_error_naming_it(tmp_path):
  manual = tmp_path / "raw"
  _jsonl_zst(manual / "cut.jsonl.zst", [_slimpajama_record(f"doc {i} " * 40) for i in range(50)])
  blob = (manual / "cut.jsonl.zst").read_bytes()
  (manual / "cut.jsonl.zst").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(UserError, match=r"cut\.jsonl\.zst is truncated"):
    builders.prepare("slimpajama", manual, tmp_path / "tfds")
  assert not list((tmp_path / "tfds").rglob(builders.STATS_FILE))


def test_slimpajama_record_without_text_is_an_error(tmp_path):
  _jsonl_zst(tmp_path / "raw" / "x.jsonl.zst", [{"content": "not slimpajama"}])
  with pytest.raises(UserError, match=r"x\.jsonl\.zst:1 has no 'text' key"):
    builders.prepare("slimpajama", tmp_path / "raw", tmp_path / "tfds")


def test_slimpajama_non_utf8_line_is_counted_and_bad_json_is_an_error(tmp_path):
  manual = tmp_path / "raw"
  manual.mkdir()
  good = json.dumps(_slimpajama_record("fine")).encode()
  compressor = zstandard.ZstdCompressor()
  (manual / "a.jsonl.zst").write_bytes(compressor.compress(good + b"\n\xff\xfe\n" + good + b"\n"))
  stats = builders.prepare("slimpajama", manual, tmp_path / "tfds")
  assert stats["documents"] == 2 and stats["skipped"] == {"non_utf8": 1}
  # A second prepare reuses the written dataset and its stats.
  assert builders.prepare("slimpajama", manual, tmp_path / "tfds") == stats

  (manual / "a.jsonl.zst").write_bytes(compressor.compress(good + b"\n{\"text\": \n"))
  with pytest.raises(UserError, match=r"a\.jsonl\.zst:2 is not valid JSON"):
    builders.prepare("slimpajama", manual, tmp_path / "tfds2")


def test_project_gutenberg_reads_parquet_and_txt(tmp_path):
  manual = tmp_path / "raw"
  manual.mkdir()
  pq.write_table(pa.table({"id": ["pg1", "pg2", "pg3"], "text": ["Moby Dick", "", None]}),
                 manual / "books.parquet")
  (manual / "alice.txt").write_text("Alice was beginning to get very tired", encoding="utf-8")
  (manual / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

  stats = builders.prepare("project_gutenberg", manual, tmp_path / "tfds")

  assert stats["documents"] == 2
  assert stats["skipped"] == {"empty_text": 2, "non_utf8": 1}
  assert _docs(builders.load("project_gutenberg", tmp_path / "tfds")) == {
      "pg1": "Moby Dick", "alice.txt:0": "Alice was beginning to get very tired"}


def test_starcoder_python_ids_from_repo_path(tmp_path):
  manual = tmp_path / "raw"
  manual.mkdir()
  pq.write_table(pa.table({"content": ["print('hi')\n", "def f():\n  return 1\n"],
                           "max_stars_repo_path": ["a/hi.py", "b/f.py"]}),
                 manual / "train-00000.parquet")
  stats = builders.prepare("starcoder_python", manual, tmp_path / "tfds")
  assert stats["documents"] == 2 and stats["skipped"] == {}
  assert _docs(builders.load("starcoder_python", tmp_path / "tfds")) == {
      "a/hi.py": "print('hi')\n", "b/f.py": "def f():\n  return 1\n"}


def test_starcoder_missing_content_column_names_file_and_column(tmp_path):
  (tmp_path / "raw").mkdir()
  pq.write_table(pa.table({"text": ["x"]}), tmp_path / "raw" / "wrong.parquet")
  with pytest.raises(UserError, match=r"wrong\.parquet has no 'content' column"):
    builders.prepare("starcoder_python", tmp_path / "raw", tmp_path / "tfds")


def test_local_text_patterns_and_shards(tmp_path):
  manual = tmp_path / "src"
  (manual / "pkg").mkdir(parents=True)
  for i in range(4):
    (manual / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
  (manual / "notes.md").write_text("not selected")
  (manual / "bad.py").write_bytes(b"\xff\xfe\x00")
  (manual / "empty.py").write_bytes(b"")

  full = builders.prepare("local_text", manual, tmp_path / "tfds", patterns=["*.py"])
  assert full["documents"] == 4 and full["files"] == 6
  assert full["skipped"] == {"non_utf8": 1, "empty_file": 1}

  # Two hosts each take a contiguous run of the sorted files; in order they are the whole.
  shards = [builders.prepare("local_text", manual, tmp_path / "tfds", patterns="*.py",
                             shard_index=i, num_shards=2) for i in range(2)]
  assert [s["files"] for s in shards] == [3, 3]
  whole = _records(builders.load("local_text", tmp_path / "tfds", patterns=["*.py"]))
  parts = [_records(builders.load("local_text", tmp_path / "tfds", patterns="*.py",
                                  shard_index=i, num_shards=2)) for i in range(2)]
  assert parts[0] + parts[1] == whole  # same records, same order
  assert [r[0] for r in whole] == ["pkg/m0.py:0", "pkg/m1.py:0", "pkg/m2.py:0", "pkg/m3.py:0"]
  # Loading without the patterns it was prepared with names what the directory does hold.
  with pytest.raises(UserError, match=r"prepared from other file patterns \(all-[0-9a-f]{8}, "
                                      r"shard0-of-2-[0-9a-f]{8}, shard1-of-2-[0-9a-f]{8}\): give"):
    builders.load("local_text", tmp_path / "tfds")
  # Prepared only in shards, the dataset loads whole: the shards concatenated.
  only_shards = tmp_path / "only_shards"
  for i in range(2):
    builders.prepare("local_text", manual, only_shards, patterns="*.py", shard_index=i,
                     num_shards=2)
  assert _records(builders.load("local_text", only_shards, patterns="*.py")) == whole
  stats = builders.read_stats("local_text", only_shards, patterns="*.py")
  assert stats["documents"] == 4 and stats["skipped"] == full["skipped"]
  # An incomplete set is an error naming the missing shard, never a silently short dataset.
  partial = tmp_path / "partial"
  builders.prepare("local_text", manual, partial, patterns="*.py", shard_index=1, num_shards=2)
  with pytest.raises(UserError, match=r"not shards \[0\]"):
    builders.load("local_text", partial, patterns="*.py")


def test_reuse_only_while_the_inputs_are_unchanged(tmp_path):
  manual = tmp_path / "raw"
  manual.mkdir()
  (manual / "a.txt").write_text("first")
  stats = builders.prepare("local_text", manual, tmp_path / "tfds")
  assert builders.prepare("local_text", manual, tmp_path / "tfds") == stats
  (manual / "a.txt").write_text("first, rewritten")  # same file count, other size
  with pytest.raises(UserError, match=r"built from different files .* size or mtime"):
    builders.prepare("local_text", manual, tmp_path / "tfds")
  rebuilt = builders.prepare("local_text", manual, tmp_path / "tfds", overwrite=True)
  assert _docs(builders.load("local_text", tmp_path / "tfds")) == {"a.txt:0": "first, rewritten"}
  # Data prepared before the inputs were recorded: the file count is still compared.
  stats_path = next((tmp_path / "tfds").rglob(builders.STATS_FILE))
  stats_path.write_text(json.dumps({k: v for k, v in rebuilt.items() if k != "inputs"}))
  builders.prepare("local_text", manual, tmp_path / "tfds")
  (manual / "b.txt").write_text("second")
  with pytest.raises(UserError, match=r"1 file\(s\) then, 2 now"):
    builders.prepare("local_text", manual, tmp_path / "tfds")


def test_user_errors(tmp_path):
  with pytest.raises(UserError, match="manual_dir .* does not exist"):
    builders.prepare("slimpajama", tmp_path / "missing", tmp_path / "tfds")
  (tmp_path / "raw").mkdir()
  with pytest.raises(UserError, match="manual_dir .* is empty"):
    builders.prepare("slimpajama", tmp_path / "raw", tmp_path / "tfds")
  (tmp_path / "raw" / "readme.md").write_text("no chunks here")
  with pytest.raises(UserError, match=r"no files matching \['\*\.jsonl\.zst'\]"):
    builders.prepare("slimpajama", tmp_path / "raw", tmp_path / "tfds")
  (tmp_path / "raw" / "empty.txt").write_text("\n")
  with pytest.raises(UserError, match="no documents in 1 file"):
    builders.prepare("local_text", tmp_path / "raw", tmp_path / "tfds")
  with pytest.raises(UserError, match="unknown dataset 'c4'"):
    builders.prepare("c4", tmp_path / "raw", tmp_path / "tfds")
  with pytest.raises(UserError, match="shard_index=2 must be in"):
    builders.prepare("local_text", tmp_path / "raw", tmp_path / "tfds", shard_index=2, num_shards=2)
  with pytest.raises(UserError, match="not prepared"):
    builders.load("local_text", tmp_path / "tfds")
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="data_dir .* a file is in the way"):
    builders.prepare("local_text", tmp_path / "raw", tmp_path / "file")


def test_loading_logs_no_custom_config_warning(tmp_path, caplog):
  """tfds warns on every run-time config, which ours always are: silenced where we build one."""
  import logging  # noqa: PLC0415
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "a.txt").write_text("some text\n")
  builders.prepare("local_text", tmp_path / "src", tmp_path / "tfds", patterns=["*.txt"])
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert len(builders.load("local_text", tmp_path / "tfds", patterns=["*.txt"])) == 1
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
