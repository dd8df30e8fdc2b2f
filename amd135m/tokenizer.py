"""Text <-> token ids, from a model's own files: a tokenizer.json, a tokenizer.model, or a GGUF.

`load_tokenizer(path)` dispatches on what `path` holds; BOS, EOS and the stop ids come from the
files' metadata, never from a guess. Where transformers 5.24 strays from the tokenizer a model was
trained with, we follow the model (tests/test_tokenizer.py pins each case):
- tokenizer.json: its own pipeline, as `tokenizers` runs it (transformers rebuilds the pipeline of
  some classes: GPT2Tokenizer drops SmolLM2's Digits step).
- tokenizer.model: sentencepiece, so a text that starts with a space still gets the dummy prefix
  ("▁▁x", as Meta's code and llama.cpp; transformers' Metaspace gives "▁x"). Special-token strings
  in the text become their ids; the text after one gets no prefix unless tokenizer_config.json sets
  `legacy` (transformers' rule).
- GGUF: llama.cpp, the format's own runtime: `tokenizer.ggml.pre` = smollm isolates digits as
  SmolLM2's tokenizer.json does (transformers ignores it), and a sentencepiece vocabulary gets the
  dummy prefix after every special token too.
"""
import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from amd135m import gguf_file
from amd135m.errors import UserError

_SPACE = "\u2581"  # sentencepiece's visible space
_LLAMA_DECODER = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]

# llama.cpp's GGUF token types (llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# `tokenizer.ggml.pre` -> how byte-level text is cut into words before BPE, as llama.cpp does.
_GPT2_PRE = ("gpt-2", "mpt", "olmo", "jais", "default")  # default: as transformers
# llama.cpp isolates each digit (regex \p{N}) before the GPT-2 regex, like SmolLM2's Digits step.
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """Encodes text to ids and back; `stop_ids` are the ids that end generation."""
  _backend: "_HFBackend | _SentencePieceBackend" = dataclasses.field(repr=False)
  vocab_size: int                 # ids run 0..vocab_size-1, added tokens included
  bos_id: int | None
  eos_id: int | None
  stop_ids: tuple[int, ...]       # eos_id first, then any other end-of-generation ids listed
  add_bos: bool                   # encode() prepends bos_id unless told otherwise
  add_eos: bool = False           # encode() appends eos_id (set by a few GGUFs, never by Llama)
  pad_id: int | None = None
  unk_id: int | None = None
  chat_template: str | None = dataclasses.field(default=None, repr=False)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special-token strings in it (`<|im_start|>`) become their ids."""
    add_bos = self.add_bos if add_bos is None else add_bos
    if add_bos and self.bos_id is None:
      raise UserError("this tokenizer has no BOS token: call encode() with add_bos=False")
    ids = self._backend.encode(text)
    if add_bos:
      ids = [self.bos_id] + ids
    if self.add_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids) -> str:
    """Text of `ids` ([T] list or array), special tokens included; any slice of ids decodes."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids, got shape {ids.shape}")
    # A cut inside a multi-byte character decodes to U+FFFD: streaming callers re-decode the tail.
    return self._backend.decode(ids.tolist())

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The model's own chat template rendered over [{'role': ..., 'content': ...}], as
    transformers renders it (a sandboxed Jinja environment, trim_blocks and lstrip_blocks)."""
    if self.chat_template is None:
      raise UserError("this model's tokenizer has no chat template: use bare prompts")
    import jinja2.sandbox  # noqa: PLC0415 (only chat prompts need it)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = {name: self.token(i) for name, i in (("bos_token", self.bos_id),
                                                   ("eos_token", self.eos_id)) if i is not None}
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special)

  def token(self, token_id: int) -> str | None:
    """The vocabulary entry for `token_id`, as the files spell it (None if out of range)."""
    return self._backend.token(token_id)

  def save_hf(self, directory: str | os.PathLike) -> None:
    """Write Hugging Face tokenizer files that AutoTokenizer loads to the same encodings."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = self._backend.save(directory, self)
    names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
             "pad_token": self.pad_id}
    special = {name: self.token(i) for name, i in names.items() if i is not None}
    config.update(special)
    config.update(add_bos_token=self.add_bos, add_eos_token=self.add_eos,
                  clean_up_tokenization_spaces=False)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special)


class _HFBackend:
  """A `tokenizers.Tokenizer` whose pipeline is the whole truth, BOS/EOS aside."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self.tok = tok

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)

  def token(self, token_id: int) -> str | None:
    return self.tok.id_to_token(token_id)

  def size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def save(self, directory: pathlib.Path, owner: Tokenizer) -> dict:
    tok = tokenizers.Tokenizer.from_str(self.tok.to_str())
    # Plain `tokenizers` users then get BOS/EOS from the file alone, as transformers users do.
    tok.post_processor = _template(owner)
    tok.save(str(directory / "tokenizer.json"))
    # transformers rebuilds the pipeline of named classes (GPT2Tokenizer...), but keeps this one's.
    return {"tokenizer_class": "PreTrainedTokenizerFast"}


class _SentencePieceBackend:
  """sentencepiece, with special-token strings cut out of the text first, as transformers does."""

  def __init__(self, model_proto: bytes, added: dict[str, int], legacy: bool):
    self.model_proto = model_proto
    self.legacy = legacy
    self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    # A second NormalizerSpec{add_dummy_prefix: false} merges into the model's own (protobuf merge
    # rules): the same model without the prefix, for the text after a special token.
    self.sp_bare = sentencepiece.SentencePieceProcessor(
        model_proto=model_proto + b"\x1a\x02\x18\x00")
    self.dummy_prefix = self.sp.encode("x") != self.sp_bare.encode("x")
    specials = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                if self.sp.is_control(i) or self.sp.is_unknown(i)}
    self.specials = {**specials, **added}
    self.pieces = {i: piece for piece, i in added.items()}
    # Longest first: of two specials starting at one place the longer wins, as in tokenizers.
    alternatives = sorted(self.specials, key=len, reverse=True)
    self.split = (re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
                  if alternatives else None)
    strip = [decoders.Strip(" ", 1, 0)] if self.dummy_prefix else []
    self.decoder = decoders.Sequence(_LLAMA_DECODER + strip)

  def encode(self, text: str) -> list[int]:
    parts = self.split.split(text) if self.split else [text]
    ids = []
    for n, part in enumerate(parts):
      if n % 2:
        ids.append(self.specials[part])
      elif part:
        # Even parts are plain text; part 0 is the one that starts the text.
        sp = self.sp if n == 0 or self.legacy else self.sp_bare
        ids.extend(sp.encode(part))
    return ids

  def decode(self, ids: list[int]) -> str:
    # transformers' decoder, so that specials read as their text and bytes fuse into characters.
    return self.decoder.decode([p for p in map(self.token, ids) if p is not None])

  def token(self, token_id: int) -> str | None:
    if 0 <= token_id < self.sp.get_piece_size():
      return self.sp.id_to_piece(token_id)
    return self.pieces.get(token_id)

  def size(self) -> int:
    return max([self.sp.get_piece_size()] + [i + 1 for i in self.pieces])

  def token_id(self, piece: str) -> int | None:
    if piece in self.specials:
      return self.specials[piece]
    token_id = self.sp.piece_to_id(piece)
    unknown = self.sp.is_unknown(token_id) and piece != self.sp.id_to_piece(token_id)
    return None if unknown else token_id

  def save(self, directory: pathlib.Path, owner: Tokenizer) -> dict:
    (directory / "tokenizer.model").write_bytes(self.model_proto)
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy}
    if self.pieces:
      config["added_tokens_decoder"] = {
          str(i): {"content": p, "special": True, "normalized": False, "lstrip": False,
                   "rstrip": False, "single_word": False} for i, p in sorted(self.pieces.items())}
    return config


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer of a Hugging Face model directory or of a .gguf file."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise UserError(f"{path} does not exist: pass a Hugging Face model directory or a .gguf file")
  if path.is_file() and path.name in ("tokenizer.json", "tokenizer.model"):
    path = path.parent
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return _from_tokenizer_json(path)
    if (path / "tokenizer.model").is_file():
      return _from_sentencepiece(path)
    if (path / "model_config.json").is_file():  # a training workdir
      raise UserError(f"{path} is a training workdir without a tokenizer (its run trained on "
                      "synthetic or pre-tokenized data): text needs one; set config.tokenizer "
                      "when training, or put the tokenizer.json it was trained with into it")
    raise UserError(f"{path} has no tokenizer.json or tokenizer.model: "
                    "pass the model's Hugging Face directory or its .gguf file")
  if path.suffix.lower() != ".gguf":
    raise UserError(f"{path} is neither a directory nor a .gguf file: "
                    "pass a Hugging Face model directory or a .gguf file")
  metadata = gguf_file.read_gguf_header(path).metadata  # reads no tensor
  return from_gguf_metadata({k: v for k, v in metadata.items() if k.startswith("tokenizer.")},
                            name=str(path))


def from_gguf_metadata(metadata: Mapping[str, Any], name: str = "the GGUF file") -> Tokenizer:
  """The tokenizer a GGUF's metadata (key -> str, int, bool or list) describes."""
  meta = metadata.get
  kind, tokens = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.tokens")
  if kind is None or tokens is None:
    raise UserError(f"{name} has no tokenizer metadata (tokenizer.ggml.model/tokens): "
                    "pass the model's Hugging Face directory instead")
  types = meta("tokenizer.ggml.token_type")
  types = [_NORMAL] * len(tokens) if types is None else [int(t) for t in types]
  if kind == "gpt2":
    tok = _gguf_byte_level(tokens, types, meta("tokenizer.ggml.merges"),
                           meta("tokenizer.ggml.pre"), name)
    add_bos_default = False  # transformers' default for a byte-level GGUF that does not say
  elif kind == "llama":
    scores = meta("tokenizer.ggml.scores")
    scores = None if scores is None else [float(x) for x in scores]
    tok = _gguf_sentencepiece(tokens, types, scores, meta("tokenizer.ggml.unknown_token_id"),
                              bool(meta("tokenizer.ggml.add_space_prefix", True)))
    add_bos_default = True  # llama.cpp and transformers: BOS for sentencepiece unless told not to
  else:
    raise UserError(f"{name}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and "
                    "'llama'): pass the model's Hugging Face directory instead")
  ids = {key: meta(f"tokenizer.ggml.{key}_token_id")
         for key in ("bos", "eos", "unknown", "padding", "eot", "eom")}
  ids = {key: None if i is None else int(i) for key, i in ids.items()}
  # Specials the metadata names are whole tokens in text, even if typed normal (transformers too).
  named = [tok.id_to_token(ids[k]) for k in ("bos", "eos", "unknown", "padding")
           if ids[k] is not None]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named if t])
  add_bos = bool(meta("tokenizer.ggml.add_bos_token", add_bos_default)) and ids["bos"] is not None
  add_eos = bool(meta("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
  return _make(_HFBackend(tok), name, bos_id=ids["bos"], eos_id=ids["eos"],
               other_stop_ids=[ids["eot"], ids["eom"]], add_bos=add_bos, add_eos=add_eos,
               pad_id=ids["padding"], unk_id=ids["unknown"],
               chat_template=meta("tokenizer.chat_template"))


def _gguf_byte_level(tokens: list[str], types: list[int], merges: list[str] | None,
                     pre: str | None, name: str) -> tokenizers.Tokenizer:
  """GPT-2 style byte-level BPE from a GGUF, with the word split that `pre` names."""
  if merges is None:
    raise UserError(f"{name} is a byte-level BPE GGUF without tokenizer.ggml.merges: "
                    "re-convert it with a current llama.cpp")
  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())
  # A few converters store raw UTF-8 instead of the byte alphabet; respell those (as transformers).
  vocab = {}
  for i, token in enumerate(tokens):
    key = token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8"))
    vocab.setdefault(key, i)
  tok = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                                        fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre is None or pre in _GPT2_PRE:
    tok.pre_tokenizer = byte_level
  elif pre in _DIGITS_PRE:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    supported = ", ".join(_GPT2_PRE + _DIGITS_PRE)
    raise UserError(f"{name}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
                    f"{supported}): pass the model's Hugging Face directory instead")
  tok.decoder = decoders.ByteLevel()
  # Control tokens outside the byte alphabet are llama.cpp mislabels: skipped, as transformers does.
  _add_typed(tok, tokens, types, lambda t: set(t) <= spelled)
  return tok


def _gguf_sentencepiece(tokens: list[str], types: list[int], scores: list[float] | None,
                        unk_id: int | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
  """A sentencepiece BPE vocabulary from a GGUF, tokenizing as llama.cpp does."""
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  tok = tokenizers.Tokenizer(models.BPE(vocab, _merges_from_scores(tokens, types, scores or []),
                                        unk_token=None if unk_id is None else tokens[unk_id],
                                        fuse_unk=True, byte_fallback=True))
  # Per stretch between specials (llama.cpp): a space in front, then every space made visible.
  prefix = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
  tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", _SPACE)])
  strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
  tok.decoder = decoders.Sequence(_LLAMA_DECODER + strip)
  _add_typed(tok, tokens, types, lambda t: True)
  return tok


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple]:
  """BPE merges for sentencepiece's rule: join the adjacent pair whose result scores best."""
  index = {}  # control, byte and unused pieces are never the result of a merge in sentencepiece
  for i, token in enumerate(tokens):
    if types[i] in (_NORMAL, _USER_DEFINED):
      index.setdefault(token, i)
  ranked = []
  for token, i in index.items():
    score = scores[i] if scores else -i  # no scores: sentencepiece BPE ids run in merge order
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in index and right in index:
        ranked.append((-score, i, index[left], left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _add_typed(tok: tokenizers.Tokenizer, tokens: list[str], types: list[int], keep) -> None:
  """Control tokens become special added tokens, user-defined ones plain added tokens."""
  control = [AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, types) if kind == _CONTROL and keep(t)]
  user = [AddedToken(t, special=False, normalized=False)
          for t, kind in zip(tokens, types) if kind == _USER_DEFINED and keep(t)]
  tok.add_special_tokens(control)
  tok.add_tokens(user)


def _from_tokenizer_json(directory: pathlib.Path) -> Tokenizer:
  """A Hugging Face directory with tokenizer.json."""
  try:
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
    raise UserError(f"{directory / 'tokenizer.json'} cannot be read ({e}): re-download it") from e
  config, model_config, generation = _hf_configs(directory)
  ids = {name: _config_token_id(config, name, tok.token_to_id)
         for name in ("bos", "eos", "unk", "pad")}
  for name in ("bos", "eos", "pad"):
    if ids[name] is None:
      ids[name] = _first(model_config.get(f"{name}_token_id"), generation.get(f"{name}_token_id"))
  # transformers adds the configured specials to the vocabulary as whole tokens; so do we.
  names = [_token_content(config.get(f"{n}_token")) for n in ("bos", "eos", "unk", "pad")]
  tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names
                          if n is not None and tok.token_to_id(n) is not None])
  if "add_bos_token" in config or "add_eos_token" in config or tok.post_processor is None:
    # transformers then replaces the file's post-processor with one built from these two flags.
    add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
  else:
    add_bos, add_eos = _post_processor_flags(tok, ids["bos"], ids["eos"], directory)
  return _make(_HFBackend(tok), str(directory), bos_id=ids["bos"], eos_id=ids["eos"],
               other_stop_ids=_id_list(model_config.get("eos_token_id"))
               + _id_list(generation.get("eos_token_id")),
               add_bos=add_bos and ids["bos"] is not None,
               add_eos=add_eos and ids["eos"] is not None, pad_id=ids["pad"], unk_id=ids["unk"],
               chat_template=_chat_template(directory, config))


def _from_sentencepiece(directory: pathlib.Path) -> Tokenizer:
  """A Hugging Face directory with only a sentencepiece tokenizer.model (Llama-2, CodeLlama)."""
  model_proto = (directory / "tokenizer.model").read_bytes()
  config, model_config, generation = _hf_configs(directory)
  added = {_token_content(t): int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
  try:
    # transformers' LlamaTokenizer: legacy off unless the config turns it on.
    backend = _SentencePieceBackend(model_proto, added, legacy=bool(config.get("legacy", False)))
  except (RuntimeError, OSError) as e:
    raise UserError(f"{directory / 'tokenizer.model'} is not a sentencepiece model ({e}): "
                    "re-download it") from e
  sp = backend.sp
  defaults = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
  ids = {}
  for name, default in defaults.items():
    ids[name] = _config_token_id(config, name, backend.token_id)
    if ids[name] is None and f"{name}_token" not in config:
      ids[name] = _first(model_config.get(f"{name}_token_id"), generation.get(f"{name}_token_id"),
                         default if default >= 0 else None)
  add_bos = config.get("add_bos_token", True)  # Llama's convention: BOS unless the config says no
  return _make(backend, str(directory), bos_id=ids["bos"], eos_id=ids["eos"],
               other_stop_ids=_id_list(model_config.get("eos_token_id"))
               + _id_list(generation.get("eos_token_id")),
               add_bos=add_bos and ids["bos"] is not None,
               add_eos=bool(config.get("add_eos_token", False)) and ids["eos"] is not None,
               pad_id=ids["pad"], unk_id=ids["unk"],
               chat_template=_chat_template(directory, config))


def _make(backend, name: str, *, bos_id: int | None, eos_id: int | None, other_stop_ids: list,
          **fields) -> Tokenizer:
  """A Tokenizer, after checking that every id the metadata names is in the vocabulary."""
  size = backend.size()
  stop_ids = tuple(dict.fromkeys(i for i in [eos_id, *other_stop_ids] if i is not None))
  for label, i in [("bos", bos_id), ("eos", eos_id), ("pad", fields.get("pad_id")),
                   ("unk", fields.get("unk_id"))] + [("stop", i) for i in stop_ids]:
    if i is not None and not 0 <= i < size:
      raise UserError(f"{name}: the {label} token id {i} is outside the vocabulary of {size}: "
                      "the tokenizer metadata is corrupt; re-download or re-convert the model")
  return Tokenizer(backend, vocab_size=size, bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids,
                   **fields)


def _post_processor_flags(tok: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None,
                          directory: pathlib.Path) -> tuple[bool, bool]:
  """(add_bos, add_eos) as the file's own post-processor decides, when the config is silent."""
  bare = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a", add_special_tokens=True).ids
  start = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), None)
  head, tail = (full[:start], full[start + len(bare):]) if start is not None else (full, [])
  if start is None or head not in ([], [bos_id]) or tail not in ([], [eos_id]):
    raise UserError(f"{directory / 'tokenizer.json'}: its post-processor adds tokens other than "
                    "BOS/EOS; set add_bos_token/add_eos_token in tokenizer_config.json")
  return bool(head), bool(tail)


def _hf_configs(directory: pathlib.Path) -> tuple[dict, dict, dict]:
  """tokenizer_config.json, config.json, generation_config.json; {} for each one missing."""
  return tuple(_read_json(directory / name) for name in
               ("tokenizer_config.json", "config.json", "generation_config.json"))


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}): fix or re-download it") from e


def _write_json(path: pathlib.Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(token) -> str | None:
  """A token as tokenizer_config.json writes it: a string, or a dict with 'content'."""
  return token.get("content") if isinstance(token, dict) else token


def _config_token_id(config: dict, name: str, token_to_id) -> int | None:
  content = _token_content(config.get(f"{name}_token"))
  return None if content is None else token_to_id(content)


def _id_list(value) -> list[int]:
  """An id field that may be one int or a list of them (generation_config's eos_token_id)."""
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(*values) -> int | None:
  for value in values:
    ids = _id_list(value)
    if ids:
      return ids[0]
  return None


def _chat_template(directory: pathlib.Path, config: dict) -> str | None:
  template = config.get("chat_template")
  if isinstance(template, list):  # a list of named templates: the default one is the chat template
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template is None and (directory / "chat_template.jinja").is_file():
    template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
  return template


def _template(owner: Tokenizer) -> processors.TemplateProcessing:
  """A post-processor that adds BOS/EOS as `owner` does."""
  bos = [owner.token(owner.bos_id)] if owner.add_bos else []
  eos = [owner.token(owner.eos_id)] if owner.add_eos else []
  specials = [(t, owner.bos_id) for t in bos] + [(t, owner.eos_id) for t in eos]
  single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
  pair = single + " " + " ".join([f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


@functools.cache
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table
