"""Tokenizer parity with transformers 5.24 (and sentencepiece, and SmolLM2's own pipeline).

Where the references disagree, amd135m/tokenizer.py's docstring says whom we follow and why; each
such place has a test below that pins our side, so a change shows up as a failure, not as drift.
"""
import inspect
import json
import pathlib
import random
import shutil
import textwrap

import gguf
import numpy as np
import pytest
import sentencepiece
import tokenizers
import transformers
from tokenizers import pre_tokenizers

from amd135m.errors import UserError
from amd135m.tokenizer import load_tokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3:45 pm on May 2nd, 2024 -- isn't it?"
CODE = ('def mean(xs: list[float]) -> float:\n\t"""Average of xs."""\n    if not xs:\n'
        '        return 0.0\n\treturn sum(xs) / len(xs)  # tabs, spaces\n\n\n'
        'print(mean([1.5, 2]))\n')
NON_ASCII = "Café naïve résumé — Ελληνικά, Русский, 東京タワー, 한국어, e\u0301 🙂🚀🇺🇸 \u200b 𝔘𝔫𝔦"
RARE = "龘𓀀☃ ꙮ 𒀱"  # characters no small vocabulary has: byte fallback, or bytes for byte-level BPE
TEXTS = [ENGLISH, CODE, NON_ASCII, RARE, "", "a", "\n", "trailing  \n"]
LEADING = ["  indented line", " one space", " "]                   # sentencepiece vs transformers
DIGIT_RUNS = ["x  1", "a\n\n3", "[1,  2,   3]\n    42", "\t\t7"]    # SmolLM2's Digits step
SMOLLM_CHAT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


transformers.logging.set_verbosity_error()  # its GGUF loader warns on every load


# ---------------------------------------------------------------- SmolLM2 GGUF (byte-level BPE)

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_gguf):
  return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent),
                                                    gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm2_digits_ref(smollm2_ref):
  """transformers' vocabulary and merges, split into words as SmolLM2's tokenizer.json does."""
  tok = tokenizers.Tokenizer.from_str(smollm2_ref.backend_tokenizer.to_str())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  return tok


def _check_decode(ours, ref, ids: list[int]) -> None:
  """Every prefix decodes as transformers decodes it: cuts inside a character included."""
  for end in range(len(ids) + 1):
    assert ours.decode(ids[:end]) == ref.decode(ids[:end]), ids[:end]


@pytest.mark.parametrize("text", TEXTS + [SMOLLM_CHAT] + LEADING)
def test_smollm2_gguf_matches_transformers(smollm2, smollm2_ref, text):
  ids = smollm2.encode(text)
  assert ids == smollm2_ref(text)["input_ids"]
  assert smollm2.decode(ids) == text
  _check_decode(smollm2, smollm2_ref, ids)


@pytest.mark.parametrize("text", TEXTS + [SMOLLM_CHAT] + LEADING + DIGIT_RUNS)
def test_smollm2_gguf_splits_digits_like_its_tokenizer_json(smollm2, smollm2_digits_ref, text):
  # transformers' GGUF loader ignores tokenizer.ggml.pre == 'smollm'; llama.cpp and SmolLM2's own
  # tokenizer.json isolate each digit first, so a whitespace run before a digit stays one word.
  assert smollm2.encode(text) == smollm2_digits_ref.encode(text).ids
  assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_digit_runs_pinned(smollm2):
  assert [smollm2.token(i) for i in smollm2.encode("x  1")] == ["x", "ĠĠ", "1"]
  assert [smollm2.token(i) for i in smollm2.encode("a\n\n3")] == ["a", "ĊĊ", "3"]
  assert [smollm2.token(i) for i in smollm2.encode("2024")] == ["2", "0", "2", "4"]


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf) -> gguf.GGUFReader:
  """The GGUF's metadata read here with gguf directly, independently of amd135m."""
  return gguf.GGUFReader(smollm2_gguf)


def test_smollm2_specials_from_metadata(smollm2, smollm2_reader):
  def meta(key):
    return smollm2_reader.fields[key].contents()

  tokens = meta("tokenizer.ggml.tokens")
  assert meta("tokenizer.ggml.model") == "gpt2" and meta("tokenizer.ggml.pre") == "smollm"
  assert smollm2.eos_id == meta("tokenizer.ggml.eos_token_id")
  assert tokens[smollm2.eos_id] == "<|im_end|>"
  assert smollm2.bos_id == meta("tokenizer.ggml.bos_token_id")
  assert tokens[smollm2.bos_id] == "<|im_start|>"
  assert smollm2.stop_ids == (smollm2.eos_id,)  # no eot/eom keys in this file
  assert smollm2.add_bos is meta("tokenizer.ggml.add_bos_token") is False
  assert smollm2.add_eos is False
  assert smollm2.pad_id == meta("tokenizer.ggml.padding_token_id")
  assert smollm2.unk_id == meta("tokenizer.ggml.unknown_token_id")
  assert smollm2.vocab_size == len(tokens) == 49152
  assert smollm2.chat_template == meta("tokenizer.chat_template")
  assert smollm2.encode("hi", add_bos=True)[0] == smollm2.bos_id
  assert smollm2.encode(SMOLLM_CHAT)[0] == smollm2.bos_id  # specials in text are whole tokens


def test_decode_takes_arrays(smollm2):
  ids = smollm2.encode(ENGLISH)
  assert smollm2.decode(np.asarray(ids, np.int32)) == ENGLISH
  with pytest.raises(ValueError, match="one sequence"):
    smollm2.decode(np.asarray(ids)[None, :])  # a batch is a caller's bug, not text
  assert smollm2.decode([]) == ""


# ------------------------------------------------- tokenizer.json directories (via our save_hf)

@pytest.fixture(scope="module")
def smollm2_hf_dir(smollm2, tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("smollm2_hf")
  smollm2.save_hf(directory)
  return directory


def test_save_hf_files(smollm2_hf_dir, smollm2):
  config = json.loads((smollm2_hf_dir / "tokenizer_config.json").read_text())
  special = json.loads((smollm2_hf_dir / "special_tokens_map.json").read_text())
  assert config["bos_token"] == special["bos_token"] == "<|im_start|>"
  assert config["eos_token"] == special["eos_token"] == "<|im_end|>"
  assert config["add_bos_token"] is False and config["add_eos_token"] is False
  assert config["chat_template"] == smollm2.chat_template
  assert (smollm2_hf_dir / "tokenizer.json").is_file()


def test_tokenizer_json_dir_round_trip(smollm2_hf_dir, smollm2):
  ours = load_tokenizer(smollm2_hf_dir)
  ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
  assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.add_bos, ours.pad_id, ours.vocab_size) == (
      smollm2.bos_id, smollm2.eos_id, smollm2.stop_ids, smollm2.add_bos, smollm2.pad_id,
      smollm2.vocab_size)
  assert ours.chat_template == smollm2.chat_template == ref.chat_template
  assert (ref.bos_token_id, ref.eos_token_id) == (ours.bos_id, ours.eos_id)
  for text in TEXTS + [SMOLLM_CHAT] + LEADING + DIGIT_RUNS:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"] == smollm2.encode(text), text
    assert ours.decode(ids) == text
    _check_decode(ours, ref, ids)


def test_chat_template_renders_as_transformers(smollm2_hf_dir, smollm2):
  ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
  for messages in ([{"role": "user", "content": "Write a haiku."}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "def f(x):\n    '''Double x.'''"},
                    {"role": "assistant", "content": "return 2 * x"}]):
    for add in (True, False):
      expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
      assert smollm2.apply_chat_template(messages, add_generation_prompt=add) == expected


def test_tokenizer_json_bos_from_post_processor(smollm2_hf_dir, tmp_path):
  # No add_bos_token in the config: the file's TemplateProcessing decides, for transformers and us.
  shutil.copy(smollm2_hf_dir / "tokenizer.json", tmp_path)
  tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)])
  tok.save(str(tmp_path / "tokenizer.json"))
  eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": "<|im_start|>", "eos_token": eos}))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  ours = load_tokenizer(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.add_bos and (ours.bos_id, ours.eos_id) == (1, 2)
  assert ours.stop_ids == (2, 0)  # every eos id of generation_config, eos_token first
  for text in [ENGLISH, CODE, SMOLLM_CHAT]:
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------- sentencepiece with Llama-2's trainer settings

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> pathlib.Path:
  """A 400-piece BPE model trained as Meta trained Llama-2's tokenizer, on text made here.

  Parity with Meta's real Llama-2 tokenizer.model is unverified: there is no hub access offline.
  """
  rng = random.Random(0)
  words = ("the of and to in is for on that with as it be by this are from at or an model token "
           "café naïve über straße 東京 世界 привет мир 1999 42 3.14").split()
  prose = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(300)]
  corpus = inspect.getsource(textwrap) + inspect.getsource(json.decoder) + "\n".join(prose)
  directory = tmp_path_factory.mktemp("spm")
  (directory / "corpus.txt").write_text(corpus, encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
      input=str(directory / "corpus.txt"), model_prefix=str(directory / "llama"),
      model_type="bpe", vocab_size=400, byte_fallback=True, split_digits=True,
      allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=0.99995,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16, num_threads=1,
      minloglevel=2)
  return directory / "llama.model"


LLAMA2_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                 "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
                 "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False,
                 "clean_up_tokenization_spaces": False}


@pytest.fixture(scope="module")
def spm_dir(spm_model, tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("spm_hf")
  shutil.copy(spm_model, directory / "tokenizer.model")
  (directory / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG))
  return directory


@pytest.fixture(scope="module")
def spm_ours(spm_dir):
  return load_tokenizer(spm_dir)


@pytest.fixture(scope="module")
def spm_ref(spm_dir):
  return transformers.AutoTokenizer.from_pretrained(str(spm_dir))


@pytest.fixture(scope="module")
def sp(spm_model):
  return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


SPM_SPECIALS = ["Hello</s> world", "<s>x", "a</s>  b<unk>c", "<s> q"]


def test_spm_dir_metadata(spm_ours, spm_ref):
  assert (spm_ours.bos_id, spm_ours.eos_id, spm_ours.unk_id, spm_ours.pad_id) == (1, 2, 0, None)
  assert spm_ours.stop_ids == (2,) and spm_ours.add_bos and not spm_ours.add_eos
  assert spm_ours.vocab_size == 400
  assert type(spm_ref).__name__ == "LlamaTokenizer" and spm_ref.legacy is False


@pytest.mark.parametrize("text", TEXTS + SPM_SPECIALS)
def test_spm_dir_matches_transformers(spm_ours, spm_ref, text):
  ids = spm_ours.encode(text)
  assert ids == spm_ref(text)["input_ids"]
  assert spm_ours.decode(ids[1:]) == text
  _check_decode(spm_ours, spm_ref, ids)


@pytest.mark.parametrize("text", TEXTS + LEADING)
def test_spm_dir_matches_sentencepiece(spm_ours, sp, text):
  assert spm_ours.encode(text) == [1] + sp.encode(text)
  assert spm_ours.decode(spm_ours.encode(text, add_bos=False)) == text


def test_spm_dir_without_config(spm_model, tmp_path):
  # Llama's and llama.cpp's convention: BOS unless a config says no (transformers 5.24 adds none).
  shutil.copy(spm_model, tmp_path / "tokenizer.model")
  ours = load_tokenizer(tmp_path / "tokenizer.model")
  assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.stop_ids) == (1, 2, 0, (2,))
  assert ours.add_bos
  assert ours.encode("Hello")[0] == 1


def test_spm_leading_space_pinned(spm_ours, spm_ref):
  # sentencepiece adds its dummy "▁" even before a leading space; transformers 5.24 doesn't.
  assert [spm_ours.token(i) for i in spm_ours.encode(" ", add_bos=False)] == ["▁▁"]
  ref_ids = spm_ref(" ", add_special_tokens=False)["input_ids"]
  assert spm_ref.convert_ids_to_tokens(ref_ids) == ["▁"]


def test_spm_byte_fallback_is_exercised(spm_ours, sp):
  ids = spm_ours.encode(RARE, add_bos=False)
  assert sum(sp.is_byte(i) for i in ids) >= 8
  assert spm_ours.decode(ids) == RARE


def test_spm_save_round_trip(spm_ours, spm_ref, tmp_path):
  spm_ours.save_hf(tmp_path)
  ours = load_tokenizer(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS + SPM_SPECIALS + LEADING:
    assert ours.encode(text) == spm_ours.encode(text), text
    assert ref(text)["input_ids"] == spm_ref(text)["input_ids"], text


# --------------------------------------------------------- GGUF with tokenizer.ggml.model = llama

def _write_gguf(path: pathlib.Path, model: str, tokens: list[str], types: list[int],
                **extra) -> None:
  """A GGUF with a tokenizer and a single dummy tensor; `extra` maps writer methods to values."""
  writer = gguf.GGUFWriter(path, arch="llama")
  for name, value in [("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                      ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 1),
                      ("layer_norm_rms_eps", 1e-5), ("vocab_size", len(tokens))]:
    getattr(writer, f"add_{name}")(value)
  writer.add_tokenizer_model(model)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  for name, value in extra.items():
    getattr(writer, f"add_{name}")(value)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _spm_token_type(sp, i: int) -> int:
  for test, kind in [(sp.is_unknown, gguf.TokenType.UNKNOWN),
                     (sp.is_control, gguf.TokenType.CONTROL),
                     (sp.is_byte, gguf.TokenType.BYTE), (sp.is_unused, gguf.TokenType.UNUSED)]:
    if test(i):
      return int(kind)
  return int(gguf.TokenType.NORMAL)


@pytest.fixture(scope="module")
def llama_gguf(sp, tmp_path_factory) -> pathlib.Path:
  """The sentencepiece model above, as llama.cpp's converter writes it into a GGUF."""
  path = tmp_path_factory.mktemp("llama_gguf") / "tiny-llama.gguf"
  n = sp.get_piece_size()
  _write_gguf(path, "llama", [sp.id_to_piece(i) for i in range(n)],
              [_spm_token_type(sp, i) for i in range(n)],
              token_scores=[sp.get_score(i) for i in range(n)], bos_token_id=1, eos_token_id=2,
              unk_token_id=0, add_bos_token=True, add_eos_token=False)
  return path


@pytest.fixture(scope="module")
def llama_gguf_ours(llama_gguf):
  return load_tokenizer(llama_gguf)


def test_llama_gguf_metadata(llama_gguf_ours):
  tok = llama_gguf_ours
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.stop_ids, tok.add_bos) == (1, 2, 0, (2,), True)
  assert tok.vocab_size == 400 and tok.chat_template is None


@pytest.mark.parametrize("text", TEXTS + LEADING)
def test_llama_gguf_matches_sentencepiece_dir(llama_gguf_ours, spm_ours, text):
  # Merges rebuilt from the scores must reproduce sentencepiece's own BPE.
  ids = llama_gguf_ours.encode(text)
  assert ids == spm_ours.encode(text)
  assert llama_gguf_ours.decode(ids) == spm_ours.decode(ids)
  assert llama_gguf_ours.decode(ids[1:]) == text


@pytest.fixture(scope="module")
def llama_gguf_ref(llama_gguf):
  return transformers.AutoTokenizer.from_pretrained(str(llama_gguf.parent),
                                                    gguf_file=llama_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_llama_gguf_matches_transformers(llama_gguf_ours, llama_gguf_ref, text):
  ids = llama_gguf_ours.encode(text)
  assert ids == llama_gguf_ref(text)["input_ids"]
  _check_decode(llama_gguf_ours, llama_gguf_ref, ids)


def test_llama_gguf_specials_like_llama_cpp(llama_gguf_ours, spm_dir, tmp_path):
  # llama.cpp puts the dummy prefix after every special token: sentencepiece under `legacy`.
  shutil.copy(spm_dir / "tokenizer.model", tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**LLAMA2_CONFIG, "legacy": True}))
  legacy = load_tokenizer(tmp_path)
  for text in SPM_SPECIALS:
    assert llama_gguf_ours.encode(text) == legacy.encode(text), text
  pieces = [llama_gguf_ours.token(i) for i in llama_gguf_ours.encode("a</s>b", add_bos=False)]
  assert pieces == ["▁a", "</s>", "▁b"]


def test_llama_gguf_save_round_trip(llama_gguf_ours, tmp_path):
  llama_gguf_ours.save_hf(tmp_path)
  ours = load_tokenizer(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS + LEADING + SPM_SPECIALS:
    ids = llama_gguf_ours.encode(text)
    assert ids == ours.encode(text) == ref(text)["input_ids"], text
    _check_decode(ours, ref, ids)


# ------------------------------------------ a small byte-level GGUF: GPT-2 split, eot stop id

@pytest.fixture(scope="module")
def gpt2_gguf(smollm2_reader, tmp_path_factory) -> pathlib.Path:
  """SmolLM2's first 3000 tokens and the merges among them, declared with the plain GPT-2 split."""
  reader = smollm2_reader
  n = 3000
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:n]
  types = reader.fields["tokenizer.ggml.token_type"].contents()[:n]
  kept = set(tokens)
  merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
            if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]
  path = tmp_path_factory.mktemp("gpt2_gguf") / "tiny-gpt2.gguf"
  _write_gguf(path, "gpt2", tokens, types, tokenizer_pre="gpt-2", token_merges=merges,
              bos_token_id=1, eos_token_id=2, eot_token_id=0, add_bos_token=True,
              chat_template="{{ messages }}")
  return path


def test_gpt2_gguf_matches_transformers(gpt2_gguf):
  ours = load_tokenizer(gpt2_gguf)
  ref = transformers.AutoTokenizer.from_pretrained(str(gpt2_gguf.parent), gguf_file=gpt2_gguf.name)
  assert ours.stop_ids == (2, 0) and ours.add_bos and ours.chat_template == "{{ messages }}"
  for text in TEXTS + [SMOLLM_CHAT] + LEADING + DIGIT_RUNS:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids[1:]) == text
    _check_decode(ours, ref, ids)


# ------------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(tmp_path)


def test_not_a_gguf(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
  with pytest.raises(UserError, match="neither a directory nor a .gguf"):
    load_tokenizer(tmp_path / "weights.bin")
  (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(UserError, match="not a GGUF file"):
    load_tokenizer(tmp_path / "broken.gguf")


def test_unsupported_gguf_tokenizer(tmp_path):
  _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [3, 1])
  with pytest.raises(UserError, match="tokenizer model 'bert' is not supported"):
    load_tokenizer(tmp_path / "bert.gguf")
  _write_gguf(tmp_path / "pre.gguf", "gpt2", ["a", "b", "ab"], [1, 1, 1], token_merges=["a b"],
              tokenizer_pre="no-such-pre")
  with pytest.raises(UserError, match="pre-tokenizer 'no-such-pre' is not supported"):
    load_tokenizer(tmp_path / "pre.gguf")


def test_bad_json(spm_dir, tmp_path):
  shutil.copy(spm_dir / "tokenizer.model", tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    load_tokenizer(tmp_path)


def test_no_bos(smollm2_hf_dir, tmp_path):
  shutil.copy(smollm2_hf_dir / "tokenizer.json", tmp_path)
  ours = load_tokenizer(tmp_path)  # no config: no BOS anyone could name
  assert ours.bos_id is None and not ours.add_bos and ours.stop_ids == ()
  with pytest.raises(UserError, match="no BOS"):
    ours.encode("hi", add_bos=True)
