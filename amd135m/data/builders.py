"""TFDS builders for the AMD-135M pretraining corpora, written as array_record without TensorFlow.

Each builder reads raw files the user downloaded into a manual_dir (nothing is fetched) and
yields text documents `{'text': str, 'id': str}` into one `train` split:

  amd135m_slimpajama         *.jsonl.zst chunks; RedPajamaBook records are skipped (AMD-135M
                             excluded them).
  amd135m_project_gutenberg  *.parquet ('text' column, optional 'id') and/or *.txt (one book each).
  amd135m_starcoder_python   *.parquet with a 'content' column (id: 'id' or 'max_stars_repo_path').
  amd135m_local_text         any files matching `patterns` (default *.txt, *.py), one per file.

Records are written in input order (sorted files, records in file order; no tfds shuffle), so a
dataset prepared in one piece or in any number of shards reads back as the same sequence.
Skips are counted by reason and written with the document count to
`<data_dir>/<name>/<config>/<version>/amd135m_stats.json`; `prepare` returns the same dict. The
stats also fingerprint the input files (names, sizes, mtimes): preparing into the same data_dir
again reuses the data only while the inputs are unchanged, and otherwise (without overwrite) is a
UserError rather than stale data. Given a tokenizer, preparation also tokenises once: it counts
tokens and writes the ids and a per-document length index beside the records
(`tokenized.TokenStore`), so the loader neither tokenises again nor reads other processes' rows.
Reasons: 'redpajama_book', 'empty_text' (missing, null or whitespace-only text), 'empty_file'
(zero-byte input file), 'non_utf8' (a text file, parquet value or jsonl line that is not UTF-8).
Errors, not skips: a missing manual_dir, no input files, a missing required column or jsonl key,
an unreadable parquet file, a corrupt JSON line, and a truncated or corrupt .jsonl.zst (a cut
download must be re-fetched, not silently shortened) raise UserError naming the file.

Parallelism: tfds's beam path is not used. `prepare(..., shard_index=i, num_shards=n)` takes the
i-th of n contiguous runs of the sorted input files and writes its own config `shard{i}-of-{n}`
(one per host, say); `workers=w` splits that run again over w local processes, writing shards
i*w .. i*w+w-1 of n*w. `load(name, data_dir)` reads whatever complete set was prepared (the
one-piece `all`, or shards 0..m-1 of m, concatenated in order); `load(..., shard_index=i,
num_shards=n)` reads one shard.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import pathlib
import re
import sys
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from amd135m.data import tokenized
from amd135m.errors import UserError, make_dir

STATS_FILE = "amd135m_stats.json"
_ZST_READ_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Which input files to read: glob patterns and this worker's shard of the sorted file list."""
  patterns: tuple[str, ...] = ()
  shard_index: int = 0
  num_shards: int = 1


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: file listing, sharding, skip counting and the stats file."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "records in input order; contiguous file shards; token length index"}
  DEFAULT_PATTERNS: tuple[str, ...] = ()
  # Set by `prepare`: called (files, documents, tokens) after each input file.
  progress: Callable[[int, int, int], None] | None = None
  tokenizer: Any = None  # set by `prepare` to count tokens and write the token store

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """None: no checksums; tfds's lookup needs `importlib_resources`, which is not installed."""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        disable_shuffling=True,  # input order: shards concatenate to the one-piece dataset
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _input_files(self, manual_dir: pathlib.Path) -> list[pathlib.Path]:
    if not manual_dir.is_dir():
      raise UserError(f"manual_dir {manual_dir} does not exist: download the raw files there first")
    files = sorted({p for pattern in self.builder_config.patterns
                    for p in manual_dir.rglob(pattern) if p.is_file()})
    if not files:  # One line: the faces print a UserError as a single line.
      how = self.MANUAL_DOWNLOAD_INSTRUCTIONS
      raise UserError(f"no files matching {list(self.builder_config.patterns)} under {manual_dir}: "
                      f"{how[0].lower()}{how[1:]}")
    return files[_shard_slice(len(files), self.builder_config.shard_index,
                              self.builder_config.num_shards)]

  def _generate_examples(self, manual_dir: pathlib.Path):
    self._skipped = collections.Counter()
    self._documents = 0
    self._writer = None
    if self.tokenizer is not None:  # data_path is tfds's incomplete dir until the end
      self.data_path.mkdir(parents=True, exist_ok=True)
      self._writer = tokenized.TokenWriter(self.data_path, self.tokenizer)
    self._tokens = 0
    files = self._input_files(manual_dir)
    self._num_files = len(files)
    self._inputs = _inputs_fingerprint(manual_dir, files)
    for path in files:
      name = path.relative_to(manual_dir).as_posix()
      documents, tokens = self._documents, self._tokens
      if path.stat().st_size == 0:
        self._skipped["empty_file"] += 1
      else:
        yield from self._file_examples(path, name)
      if self.progress is not None:
        self.progress(1, self._documents - documents, self._tokens - tokens)
    if not self._documents:
      raise UserError(f"no documents in {len(files)} file(s) under {manual_dir}: "
                      f"all were skipped {dict(self._skipped)}; check the input files")

  def _file_examples(self, path: pathlib.Path, name: str):
    for index, record in enumerate(self._read_file(path)):
      if record is None:  # The reader already counted why it skipped this record.
        continue
      text, record_id = record
      if text is None or not text.strip():
        self._skipped["empty_text"] += 1
        continue
      self._documents += 1
      if self._writer is not None:  # record order is generation order (no shuffle)
        self._tokens += self._writer.add(text)
      # The key must be unique across files even when records carry duplicate ids.
      yield f"{name}:{index}", {"text": text, "id": record_id or f"{name}:{index}"}

  def _read_file(self, path: pathlib.Path) -> Iterator[tuple[str | None, str | None] | None]:
    """Yields (text or None, own id or None) per record, or None for a record it counted skipped."""
    raise NotImplementedError

  def _download_and_prepare(self, dl_manager, download_config):
    self._writer = None
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except BaseException:
      if self._writer is not None:
        self._writer.abort()
      raise
    # Written inside tfds's incomplete dir, so the stats appear atomically with the data.
    stats = self._stats(dl_manager)
    if self._writer is not None:
      stats.update(self._writer.close())
    (self.data_path / STATS_FILE).write_text(json.dumps(stats, indent=1))

  def _stats(self, dl_manager) -> dict:
    config = self.builder_config
    return {
        "name": self.name, "config": config.name, "version": str(self.version),
        "manual_dir": str(dl_manager.manual_dir), "patterns": list(config.patterns),
        "shard_index": config.shard_index, "num_shards": config.num_shards,
        "files": self._num_files, "inputs": self._inputs, "documents": self._documents,
        "skipped": dict(sorted(self._skipped.items())),
    }

  def _read_text(self, path: pathlib.Path) -> Iterator[tuple[str | None, str | None]]:
    try:
      text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
      self._skipped["non_utf8"] += 1
      yield None
      return
    yield text, None

  def _read_parquet(self, path: pathlib.Path, text_column: str, id_columns: tuple[str, ...]):
    import pyarrow.parquet as pq  # Only the parquet builders need pyarrow.
    try:
      parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file.
      raise UserError(f"{path} is not a readable parquet file ({e}): re-download it") from e
    names = parquet.schema_arrow.names
    if text_column not in names:
      raise UserError(f"{path} has no '{text_column}' column (columns: {names}): "
                      f"point manual_dir at the right files")
    id_column = next((c for c in id_columns if c in names), None)
    columns = [text_column] + ([id_column] if id_column else [])
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
      texts = batch.column(text_column).to_pylist()
      ids = batch.column(id_column).to_pylist() if id_column else [None] * len(texts)
      for text, record_id in zip(texts, ids):
        if isinstance(text, bytes):  # A binary column: decode it as UTF-8 or count a skip.
          try:
            text = text.decode("utf-8")
          except UnicodeDecodeError:
            self._skipped["non_utf8"] += 1
            yield None
            continue
        yield text, None if record_id is None else str(record_id)


class Amd135mSlimpajama(_TextBuilder):
  """SlimPajama-627B jsonl.zst chunks, RedPajamaBook excluded."""

  name = "amd135m_slimpajama"
  DEFAULT_PATTERNS = ("*.jsonl.zst",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the SlimPajama-627B chunks (e.g. `huggingface-cli download "
      "cerebras/SlimPajama-627B --repo-type dataset --include 'train/*'`) and pass their "
      "directory as manual_dir; "
      "*.jsonl.zst files are found recursively.")

  def _read_file(self, path):
    for line_number, line in enumerate(_zst_lines(path), start=1):
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError:
        self._skipped["non_utf8"] += 1
        yield None
        continue
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_number} is not valid JSON ({e}): re-download it") from e
      if "text" not in record:
        raise UserError(f"{path}:{line_number} has no 'text' key: is this a SlimPajama chunk?")
      if (record.get("meta") or {}).get("redpajama_set_name") == "RedPajamaBook":
        self._skipped["redpajama_book"] += 1
        yield None
        continue
      yield record["text"], None


class Amd135mProjectGutenberg(_TextBuilder):
  """Project Gutenberg books from parquet ('text' column) or plain .txt files."""

  name = "amd135m_project_gutenberg"
  DEFAULT_PATTERNS = ("*.parquet", "*.txt")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download Project Gutenberg as parquet (e.g. `huggingface-cli download "
      "manu/project_gutenberg --repo-type dataset`) or as plain .txt books, and pass the "
      "directory as manual_dir.")

  def _read_file(self, path):
    if path.suffix == ".parquet":
      return self._read_parquet(path, "text", ("id", "title"))
    return self._read_text(path)


class Amd135mStarcoderPython(_TextBuilder):
  """StarCoder Python parquet files ('content' column)."""

  name = "amd135m_starcoder_python"
  DEFAULT_PATTERNS = ("*.parquet",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the Python subset of StarCoderData (e.g. `huggingface-cli download "
      "bigcode/starcoderdata --repo-type dataset --include 'python/*'`) and pass it as manual_dir.")

  def _read_file(self, path):
    return self._read_parquet(path, "content", ("id", "max_stars_repo_path"))


class Amd135mLocalText(_TextBuilder):
  """Any directory tree of text or source files, one document per file."""

  name = "amd135m_local_text"
  DEFAULT_PATTERNS = ("*.txt", "*.py")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass a directory of text or source files as manual_dir; `patterns` (default *.txt, *.py) "
      "select files recursively.")

  def _read_file(self, path):
    return self._read_text(path)


BUILDERS = {cls.name.removeprefix("amd135m_"): cls for cls in
            (Amd135mSlimpajama, Amd135mProjectGutenberg, Amd135mStarcoderPython, Amd135mLocalText)}


def _zst_lines(path: pathlib.Path) -> Iterator[bytes]:
  """Lines of a (multi-frame) .zst file; a cut or corrupt stream raises UserError."""
  import zstandard  # Only SlimPajama needs it.
  decompressor = zstandard.ZstdDecompressor()
  frame = decompressor.decompressobj()
  frame_has_input = False
  pending = b""
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_ZST_READ_BYTES):
        while chunk:
          frame_has_input = True
          pending += frame.decompress(chunk)
          chunk = b""
          if frame.eof:  # A new frame may start in the bytes left over.
            chunk = frame.unused_data
            frame = decompressor.decompressobj()
            frame_has_input = False
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
  except zstandard.ZstdError as e:
    raise UserError(f"{path} is a corrupt zstd file ({e}): re-download it") from e
  # stream_reader would return short output here without an error, hence decompressobj.
  if frame_has_input:
    raise UserError(f"{path} is truncated (its last zstd frame is incomplete): re-download it")
  if pending.strip():
    yield pending


def _shard_slice(num_files: int, shard_index: int, num_shards: int) -> slice:
  """The shard_index-th of num_shards contiguous runs: in order, they concatenate to all files."""
  return slice(shard_index * num_files // num_shards, (shard_index + 1) * num_files // num_shards)


def _config_name(cls, patterns: tuple[str, ...], shard_index: int, num_shards: int) -> str:
  name = "all" if num_shards == 1 else f"shard{shard_index}-of-{num_shards}"
  if patterns != cls.DEFAULT_PATTERNS:
    # Different file selections must not share (and silently reuse) one prepared directory.
    name += "-" + hashlib.sha1("\n".join(patterns).encode()).hexdigest()[:8]
  return name


def _builder(name: str, data_dir, patterns=None, shard_index: int = 0, num_shards: int = 1):
  if name not in BUILDERS:
    raise UserError(f"unknown dataset {name!r}: choose one of {sorted(BUILDERS)}")
  if not 0 <= shard_index < num_shards:
    raise UserError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
  cls = BUILDERS[name]
  patterns = _patterns(cls, patterns)
  config = SourceConfig(name=_config_name(cls, patterns, shard_index, num_shards),
                        patterns=patterns, shard_index=shard_index, num_shards=num_shards)
  return cls(data_dir=str(data_dir), config=config, file_format="array_record")


class _NoCustomConfigNote(logging.Filter):
  """tfds logs "Using custom data configuration" for every config built at run time, which ours
  always are: a warning line per source in every training or evaluation log, meaning nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_NoCustomConfigNote())


def _patterns(cls, patterns) -> tuple[str, ...]:
  return tuple([patterns] if isinstance(patterns, str) else patterns or cls.DEFAULT_PATTERNS)


def _tokenizer(tokenizer):
  if not isinstance(tokenizer, (str, pathlib.PurePath)):
    return tokenizer  # None, or a loaded Tokenizer
  from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415 (only when counting tokens)
  return load_tokenizer(tokenizer)


def prepare(name: str, manual_dir, data_dir, *, patterns=None, shard_index: int = 0,
            num_shards: int = 1, workers: int = 1, tokenizer=None, overwrite: bool = False,
            progress: Callable[[int, int, int], None] | None = None) -> dict:
  """Writes `name` (e.g. 'slimpajama') from manual_dir into data_dir; returns its stats dict.

  `workers` local processes split this shard's files (see the module doc); `tokenizer` (a
  Tokenizer or its path) adds token counts and the token store; `progress(files, documents,
  tokens)` is called after each input file, from this process."""
  manual_dir = pathlib.Path(manual_dir).expanduser()
  if not manual_dir.is_dir():
    raise UserError(f"manual_dir {manual_dir} does not exist: download the raw files there first")
  if not any(manual_dir.iterdir()):  # tfds would raise a bare AssertionError here.
    raise UserError(f"manual_dir {manual_dir} is empty: download the raw files there first")
  if workers < 1:
    raise UserError(f"workers must be >= 1, got {workers}")
  _builder(name, data_dir, patterns, shard_index, num_shards)  # validates name and shard
  make_dir(data_dir, "data_dir")  # tfds would fail deep inside with a bare OSError
  if workers == 1:
    return _prepare_shard(name, manual_dir, data_dir, patterns, shard_index, num_shards,
                          _tokenizer(tokenizer), overwrite, progress)
  shards = [shard_index * workers + w for w in range(workers)]
  context = multiprocessing.get_context("spawn")  # tfds and tokenizers hold threads: no fork
  with multiprocessing.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context) as pool:
    queue = manager.Queue() if progress is not None else None
    futures = [pool.submit(_prepare_worker, name, manual_dir, data_dir, patterns, shard,
                           num_shards * workers, tokenizer, overwrite, queue)
               for shard in shards]
    while progress is not None and not all(f.done() for f in futures):
      try:
        progress(*queue.get(timeout=0.2))
      except Exception:  # queue.Empty, re-exported through the manager's proxy
        pass
    while queue is not None and not queue.empty():
      progress(*queue.get())
    return _merge_stats([f.result() for f in futures])


def _prepare_worker(name, manual_dir, data_dir, patterns, shard_index, num_shards, tokenizer,
                    overwrite, queue) -> dict:
  """One local worker's shard, in its own process; progress goes back through `queue`."""
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns on every custom config
  tfds.disable_progress_bar()
  progress = None if queue is None else lambda *counts: queue.put(counts)
  with contextlib.redirect_stdout(sys.stderr):  # tfds prints; stdout may carry a result
    return _prepare_shard(name, manual_dir, data_dir, patterns, shard_index, num_shards,
                          _tokenizer(tokenizer), overwrite, progress)


def _prepare_shard(name, manual_dir, data_dir, patterns, shard_index, num_shards, tokenizer,
                   overwrite, progress) -> dict:
  builder = _builder(name, data_dir, patterns, shard_index, num_shards)
  builder.tokenizer, builder.progress = tokenizer, progress
  stats_path = builder.data_path / STATS_FILE
  if not overwrite and stats_path.exists():  # tfds would reuse it whatever the inputs are now
    _check_inputs(builder, manual_dir, json.loads(stats_path.read_text()))
  mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite
          else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), download_mode=mode))
  stats = json.loads(stats_path.read_text())
  if tokenizer is not None and not tokenized.TokenStore.exists(builder.data_path, tokenizer):
    # Prepared before without this tokenizer: tokenise the written records now.
    stats.update(tokenize_prepared(builder, tokenizer))
    stats_path.write_text(json.dumps(stats, indent=1))
  return stats


def _inputs_fingerprint(manual_dir: pathlib.Path, files: list[pathlib.Path]) -> str:
  """Names, sizes and mtimes of the input files: an added, removed or rewritten file changes it."""
  lines = []
  for path in files:
    stat = path.stat()
    lines.append(f"{path.relative_to(manual_dir).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
  return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def _check_inputs(builder, manual_dir: pathlib.Path, stats: dict):
  """Refuses to reuse prepared data that was built from other files than manual_dir holds now."""
  files = builder._input_files(manual_dir)
  if "inputs" in stats:
    same = stats["inputs"] == _inputs_fingerprint(manual_dir, files)
  else:  # prepared before the inputs were recorded: only the file count can be compared
    same = stats["files"] == len(files)
  if not same:
    what = (f"{stats['files']} file(s) then, {len(files)} now" if stats["files"] != len(files)
            else "a file's size or mtime differs")
    raise UserError(f"the prepared data at {builder.data_path} was built from different files "
                    f"than {manual_dir} holds now ({what}): pass --overwrite to rebuild it, or a "
                    "new --data-dir")


def tokenize_prepared(builder, tokenizer, progress: Callable[[int], None] | None = None) -> dict:
  """Tokenises a prepared config's records into its token store; returns the stats fields.
  `progress(documents)` is called every 256 documents."""
  records = _data_source(builder)
  writer = tokenized.TokenWriter(builder.data_path, tokenizer)
  try:
    for i in range(len(records)):
      text = records[i]["text"]
      writer.add(text.decode("utf-8") if isinstance(text, bytes) else text)
      if progress is not None and ((i + 1) % 256 == 0 or i + 1 == len(records)):
        progress((i + 1) % 256 or 256)
  except BaseException:
    writer.abort()
    raise
  return writer.close()


def count_tokens(name: str, data_dir, tokenizer, *, patterns=None,
                 shard_index: int | None = None, num_shards: int | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
  """Tokens of a prepared dataset: from its token store, else by tokenising every record (and
  then writing the store and the count into its stats, so the loader and the next call reuse
  them)."""
  tokenizer = _tokenizer(tokenizer)
  fingerprint = tokenized.fingerprint(tokenizer)
  total = 0
  for builder in _prepared(name, data_dir, patterns, shard_index, num_shards):
    stats_path = builder.data_path / STATS_FILE
    stats = json.loads(stats_path.read_text())
    if (stats.get("tokenizer") != fingerprint
        or not tokenized.TokenStore.exists(builder.data_path, tokenizer)):
      stats.update(tokenize_prepared(builder, tokenizer, progress))
      stats_path.write_text(json.dumps(stats, indent=1))
    total += stats["tokens"]
  return total


def input_files(name: str, manual_dir, *, patterns=None, shard_index: int = 0,
                num_shards: int = 1) -> list[pathlib.Path]:
  """The raw files `prepare` would read for this shard (for a progress total)."""
  return _builder(name, "/nonexistent", patterns, shard_index, num_shards)._input_files(
      pathlib.Path(manual_dir).expanduser())


def _merge_stats(shards: list[dict]) -> dict:
  """One stats dict for a set of shards: counts add up; per-shard configs are listed."""
  merged = {k: shards[0][k] for k in ("name", "version", "manual_dir", "patterns")}
  merged["configs"] = [s["config"] for s in shards]
  merged["num_shards"] = shards[0]["num_shards"]
  merged["files"] = sum(s["files"] for s in shards)
  merged["documents"] = sum(s["documents"] for s in shards)
  skipped = collections.Counter()
  for s in shards:
    skipped.update(s["skipped"])
  merged["skipped"] = dict(sorted(skipped.items()))
  if all("tokens" in s for s in shards) and len({s["tokenizer"] for s in shards}) == 1:
    merged["tokens"] = sum(s["tokens"] for s in shards)
    merged["tokenizer"] = shards[0]["tokenizer"]
  return merged


def _is_prepared(builder) -> bool:
  return (builder.data_path / STATS_FILE).exists()


def _prepared(name: str, data_dir, patterns, shard_index: int | None,
              num_shards: int | None) -> list:
  """The builders of one complete prepared set: one shard if shard_index is given, else `all`
  or every shard of the smallest complete count (all such sets hold the same records)."""
  if shard_index is not None:
    builders = [_builder(name, data_dir, patterns, shard_index, num_shards or 1)]
  elif num_shards is not None:
    builders = [_builder(name, data_dir, patterns, i, num_shards) for i in range(num_shards)]
  else:
    builders = [_builder(name, data_dir, patterns)]
    if not _is_prepared(builders[0]):
      counts = _shard_counts(name, data_dir, patterns)
      complete = [n for n in counts
                  if all(_is_prepared(_builder(name, data_dir, patterns, i, n))
                         for i in range(n))]
      if complete:
        builders = [_builder(name, data_dir, patterns, i, complete[0])
                    for i in range(complete[0])]
      elif counts:
        n = counts[0]
        missing = [i for i in range(n)
                   if not _is_prepared(_builder(name, data_dir, patterns, i, n))]
        raise UserError(f"{name} under {data_dir} has shards of {n} but not shards {missing}: "
                        f"prepare them (--shard-index i --num-shards {n}) first")
  for builder in builders:
    if not _is_prepared(builder):
      wanted = pathlib.Path(builder.data_path).parent  # .../BUILDER/CONFIG/VERSION
      others = sorted(p.name for p in wanted.parent.glob("*")
                      if p.is_dir() and p.name != wanted.name) if wanted.parent.is_dir() else []
      hint = (f"; it holds {name} prepared from other file patterns ({', '.join(others)}): give "
              f"the patterns it was prepared with, e.g. {name}@{data_dir}:*.txt"
              if others else f": run `python -m amd135m.data prepare --dataset {name} ...` first")
      raise UserError(f"{name} is not prepared under {data_dir} (no {builder.data_path}){hint}")
  return builders


def _shard_counts(name: str, data_dir, patterns) -> list[int]:
  """Shard counts n with some `shard{i}-of-{n}` config of these patterns under data_dir."""
  cls = BUILDERS[name]
  suffix = _config_name(cls, _patterns(cls, patterns), 0, 1).removeprefix("all")
  pattern = re.compile(rf"shard\d+-of-(\d+){re.escape(suffix)}")
  root = pathlib.Path(data_dir) / cls.name
  found = {int(m.group(1)) for d in (root.iterdir() if root.is_dir() else ())
           if (m := pattern.fullmatch(d.name))}
  return sorted(found)


def read_stats(name: str, data_dir, *, patterns=None, shard_index: int | None = None,
               num_shards: int | None = None) -> dict:
  """The stats `prepare` wrote (documents, files, skipped records by reason, tokens if counted);
  summed over shards when the dataset was prepared in shards."""
  stats = [json.loads((b.data_path / STATS_FILE).read_text())
           for b in _prepared(name, data_dir, patterns, shard_index, num_shards)]
  return stats[0] if len(stats) == 1 else _merge_stats(stats)


def _data_source(builder):
  return tfds.data_source(builder.name, split="train", data_dir=str(builder.data_dir_root),
                          download=False, builder_kwargs={"config": builder.builder_config,
                                                          "file_format": "array_record"})


def load(name: str, data_dir, split: str = "train", *, patterns=None,
         shard_index: int | None = None, num_shards: int | None = None):
  """Random-access source over a prepared dataset; records are {'text': bytes, 'id': bytes}.

  Without shard_index: the whole dataset, however it was prepared (see the module doc)."""
  if split != "train":
    raise UserError(f"the builders write one split, 'train', not {split!r}: hold out documents "
                    "with amd135m.data.splits.holdout")
  sources = [_data_source(b) for b in _prepared(name, data_dir, patterns, shard_index, num_shards)]
  return sources[0] if len(sources) == 1 else Concatenated(sources)


def load_tokens(name: str, data_dir, tokenizer, *, patterns=None,
                shard_index: int | None = None, num_shards: int | None = None):
  """The `TokenStore` of `load(...)`'s records for this tokenizer (shards concatenated), or None
  if a shard has none (prepare with a tokenizer, or run `stats --tokenizer`)."""
  tokenizer = _tokenizer(tokenizer)
  paths = [b.data_path for b in _prepared(name, data_dir, patterns, shard_index, num_shards)]
  if not all(tokenized.TokenStore.exists(path, tokenizer) for path in paths):
    return None
  stores = [tokenized.TokenStore(path, tokenizer) for path in paths]
  return stores[0] if len(stores) == 1 else Concatenated(stores)


def load_token_documents(name: str, data_dir, tokenizer, *, patterns=None):
  """The token-id documents of a prepared dataset: its `TokenStore` if one was written for this
  tokenizer, else a `TokenizedSource` that tokenises each record as it is read."""
  store = load_tokens(name, data_dir, tokenizer, patterns=patterns)
  if store is not None:
    return store
  return tokenized.TokenizedSource(load(name, data_dir, patterns=patterns), tokenizer)


class Concatenated:
  """Random access over sources laid end to end (the shards of one prepared dataset); it has
  `lengths` when every part has."""

  def __init__(self, sources):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources])
    parts = [getattr(s, "lengths", None) for s in self.sources]
    self.lengths = None if any(p is None for p in parts) else np.concatenate(parts)

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} is outside [0, {len(self)})")
    part = int(np.searchsorted(self._ends, index, side="right"))
    return self.sources[part][index - (int(self._ends[part - 1]) if part else 0)]
