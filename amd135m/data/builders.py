"""TFDS builders for the AMD-135M pretraining corpora, written as array_record without TensorFlow.

Each builder reads raw files the user downloaded into a manual_dir (nothing is fetched) and
yields text documents `{'text': str, 'id': str}` into one `train` split:

  amd135m_slimpajama         *.jsonl.zst chunks; RedPajamaBook records are skipped (AMD-135M
                             excluded them).
  amd135m_project_gutenberg  *.parquet ('text' column, optional 'id') and/or *.txt (one book each).
  amd135m_starcoder_python   *.parquet with a 'content' column (id: 'id' or 'max_stars_repo_path').
  amd135m_local_text         any files matching `patterns` (default *.txt, *.py), one per file.

Skips are counted by reason and written with the document count to
`<data_dir>/<name>/<config>/<version>/amd135m_stats.json`; `prepare` returns the same dict.
Reasons: 'redpajama_book', 'empty_text' (missing, null or whitespace-only text), 'empty_file'
(zero-byte input file), 'non_utf8' (a text file, parquet value or jsonl line that is not UTF-8).
Errors, not skips: a missing manual_dir, no input files, a missing required column or jsonl key,
an unreadable parquet file, a corrupt JSON line, and a truncated or corrupt .jsonl.zst (a cut
download must be re-fetched, not silently shortened) raise UserError naming the file.

Parallelism: tfds's beam path is not used, so one process reads its files in order. To split
work across processes or hosts, each one runs `prepare(..., shard_index=i, num_shards=n)`; it
takes files[i::n] of the sorted input list and writes its own config `shard{i}-of-{n}`, which
`load(..., shard_index=i, num_shards=n)` reads back.
"""
import collections
import dataclasses
import hashlib
import json
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from amd135m.errors import UserError

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

  VERSION = tfds.core.Version("1.0.0")
  DEFAULT_PATTERNS: tuple[str, ...] = ()

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
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _input_files(self, manual_dir: pathlib.Path) -> list[pathlib.Path]:
    if not manual_dir.is_dir():
      raise UserError(f"manual_dir {manual_dir} does not exist: download the raw files there first")
    files = sorted({p for pattern in self.builder_config.patterns
                    for p in manual_dir.rglob(pattern) if p.is_file()})
    if not files:
      raise UserError(f"no files matching {list(self.builder_config.patterns)} under {manual_dir}: "
                      f"check manual_dir\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return files[self.builder_config.shard_index::self.builder_config.num_shards]

  def _generate_examples(self, manual_dir: pathlib.Path):
    self._skipped = collections.Counter()
    self._documents = 0
    files = self._input_files(manual_dir)
    self._num_files = len(files)
    for path in files:
      name = path.relative_to(manual_dir).as_posix()
      if path.stat().st_size == 0:
        self._skipped["empty_file"] += 1
        continue
      for index, record in enumerate(self._read_file(path)):
        if record is None:  # The reader already counted why it skipped this record.
          continue
        text, record_id = record
        if text is None or not text.strip():
          self._skipped["empty_text"] += 1
          continue
        self._documents += 1
        # The key must be unique across files even when records carry duplicate ids.
        yield f"{name}:{index}", {"text": text, "id": record_id or f"{name}:{index}"}
    if not self._documents:
      raise UserError(f"no documents in {len(files)} file(s) under {manual_dir}: "
                      f"all were skipped {dict(self._skipped)}; check the input files")

  def _read_file(self, path: pathlib.Path) -> Iterator[tuple[str | None, str | None] | None]:
    """Yields (text or None, own id or None) per record, or None for a record it counted skipped."""
    raise NotImplementedError

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    # Written inside tfds's incomplete dir, so the stats appear atomically with the data.
    (self.data_path / STATS_FILE).write_text(json.dumps(self._stats(dl_manager), indent=1))

  def _stats(self, dl_manager) -> dict:
    config = self.builder_config
    return {
        "name": self.name, "config": config.name, "version": str(self.version),
        "manual_dir": str(dl_manager.manual_dir), "patterns": list(config.patterns),
        "shard_index": config.shard_index, "num_shards": config.num_shards,
        "files": self._num_files, "documents": self._documents,
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


def _builder(name: str, data_dir, patterns=None, shard_index: int = 0, num_shards: int = 1):
  if name not in BUILDERS:
    raise UserError(f"unknown dataset {name!r}: choose one of {sorted(BUILDERS)}")
  if not 0 <= shard_index < num_shards:
    raise UserError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
  cls = BUILDERS[name]
  patterns = tuple([patterns] if isinstance(patterns, str) else patterns or cls.DEFAULT_PATTERNS)
  config_name = "all" if num_shards == 1 else f"shard{shard_index}-of-{num_shards}"
  if patterns != cls.DEFAULT_PATTERNS:
    # Different file selections must not share (and silently reuse) one prepared directory.
    config_name += "-" + hashlib.sha1("\n".join(patterns).encode()).hexdigest()[:8]
  config = SourceConfig(name=config_name, patterns=patterns, shard_index=shard_index,
                        num_shards=num_shards)
  return cls(data_dir=str(data_dir), config=config, file_format="array_record")


def prepare(name: str, manual_dir, data_dir, *, patterns=None, shard_index: int = 0,
            num_shards: int = 1, overwrite: bool = False) -> dict:
  """Writes `name` (e.g. 'slimpajama') from manual_dir into data_dir; returns its stats dict."""
  manual_dir = pathlib.Path(manual_dir).expanduser()
  if not manual_dir.is_dir():
    raise UserError(f"manual_dir {manual_dir} does not exist: download the raw files there first")
  if not any(manual_dir.iterdir()):  # tfds would raise a bare AssertionError here.
    raise UserError(f"manual_dir {manual_dir} is empty: download the raw files there first")
  builder = _builder(name, data_dir, patterns, shard_index, num_shards)
  mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite
          else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), download_mode=mode))
  return json.loads((builder.data_path / STATS_FILE).read_text())


def _prepared(name: str, data_dir, patterns, shard_index: int, num_shards: int):
  builder = _builder(name, data_dir, patterns, shard_index, num_shards)
  if not (builder.data_path / STATS_FILE).exists():
    raise UserError(f"{name} is not prepared under {data_dir} (no {builder.data_path}): "
                    f"run `python -m amd135m.data prepare --dataset {name} ...` first")
  return builder


def read_stats(name: str, data_dir, *, patterns=None, shard_index: int = 0,
               num_shards: int = 1) -> dict:
  """The stats `prepare` wrote: documents, files, and skipped records by reason."""
  builder = _prepared(name, data_dir, patterns, shard_index, num_shards)
  return json.loads((builder.data_path / STATS_FILE).read_text())


def load(name: str, data_dir, split: str = "train", *, patterns=None, shard_index: int = 0,
         num_shards: int = 1):
  """Random-access source over a prepared dataset; records are {'text': bytes, 'id': bytes}."""
  builder = _prepared(name, data_dir, patterns, shard_index, num_shards)
  return tfds.data_source(builder.name, split=split, data_dir=str(data_dir), download=False,
                          builder_kwargs={"config": builder.builder_config,
                                          "file_format": "array_record"})
