"""`python -m amd135m.generate` as a user runs it: JSON lines out, one-line errors with exit 2."""
import inspect
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from amd135m import checkpoints, generate, inference, sampling, tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time"]
FILE_PROMPT = "Le café est"  # non-ASCII: the prompts file is read as UTF-8, printed unescaped
MAX_NEW = 8


def run_cli(*args, timeout=300) -> tuple[int, str, str]:
  """Runs the CLI in a fresh interpreter; returns (returncode, stdout, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Share the suite's persistent compilation cache, so reruns skip the SmolLM2 compile.
  cache_dir = jax.config.jax_compilation_cache_dir
  if cache_dir:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   str(jax.config.jax_persistent_cache_min_compile_time_secs))
  proc = subprocess.run([sys.executable, "-m", "amd135m.generate", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
  return tokenizer_lib.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": FILE_PROMPT}, ensure_ascii=False) + "\n\n",
                  encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def cli_records(smollm2_gguf, prompts_file):
  """The one SmolLM2 subprocess run of this file (a compile costs ~10 s): greedy, batch of 3."""
  code, out, err = run_cli("--model", smollm2_gguf, "--prompt", PROMPTS[0], "--prompt",
                           PROMPTS[1], "--prompts-file", prompts_file,
                           "--max-new-tokens", MAX_NEW, "--temperature", 0, "--json")
  assert code == 0, err
  assert "Traceback" not in err
  return [json.loads(line) for line in out.splitlines()]


def test_json_lines(cli_records, tokenizer):
  assert [r["prompt"] for r in cli_records] == PROMPTS + [FILE_PROMPT]
  for r in cli_records:
    ids = r["token_ids"]
    assert r["new_tokens"] == len(ids) and 1 <= len(ids) <= MAX_NEW
    assert all(isinstance(t, int) for t in ids)
    # token_ids are the new tokens only; a row ends early only on a stop token.
    assert len(ids) == MAX_NEW or (r["stopped"] and ids[-1] in tokenizer.stop_ids)
    shown = ids[:-1] if r["stopped"] else ids
    assert r["completion"] == tokenizer.decode(shown)
    assert r["seconds"] > 0 and r["tokens_per_second"] > 0
    # the first token comes after encoding and prefill, before the rest of the batch's tokens
    assert 0 < r["first_token_seconds"] < r["seconds"] and r["compile_seconds"] >= 0


def test_greedy_cli_matches_in_process_generate(cli_records, smollm2, tokenizer):
  config, params = smollm2
  texts = [r["prompt"] for r in cli_records]
  expected = sampling.generate(params, config, [tokenizer.encode(t) for t in texts], MAX_NEW,
                               sampling.SamplingParams(0.0), stop_ids=list(tokenizer.stop_ids))
  assert [r["token_ids"] for r in cli_records] == expected.tokens


def test_sampling_flags_reach_generate_text(smollm2, smollm2_gguf, monkeypatch, capsys):
  """In process: the flags arrive as SamplingParams and a seed, and the seed decides the draw."""
  seen = []
  real = inference.generate_text

  def spy(*args, **kwargs):
    bound = inspect.signature(real).bind(*args, **kwargs).arguments
    seen.append((bound["max_new_tokens"], bound["sampling_params"], bound["seed"]))
    return real(*args, **kwargs)

  monkeypatch.setattr(inference, "generate_text", spy)
  # The session's params, not a second GGUF read; same batch shapes as above, so no new compile.
  monkeypatch.setattr(checkpoints, "load_params", lambda *args, **kwargs: smollm2)

  def sample(seed):
    argv = ["--model", str(smollm2_gguf), "--max-new-tokens", str(MAX_NEW), "--json",
            "--temperature", "2.0", "--top-k", "50", "--top-p", "0.95", "--seed", str(seed)]
    for text in PROMPTS + [FILE_PROMPT]:
      argv += ["--prompt", text]
    assert generate.main(argv) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]

  first, again, other = sample(7), sample(7), sample(8)
  assert seen == [(MAX_NEW, sampling.SamplingParams(2.0, 50, 0.95), s) for s in (7, 7, 8)]
  assert first == again
  assert first != other


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback, and no compile (each case takes ~1-3 s).

def _missing(tmp_path, request):
  return ["--model", tmp_path / "nope.gguf", "--prompt", "hi"]


def _garbage_gguf(tmp_path, request):
  path = tmp_path / "garbage.gguf"
  path.write_bytes(bytes(range(256)) * 64)
  return ["--model", path, "--prompt", "hi"]


def _truncated_gguf(tmp_path, request):
  path = tmp_path / "truncated.gguf"
  with open(request.getfixturevalue("smollm2_gguf"), "rb") as src, open(path, "wb") as dst:
    dst.write(src.read(1 << 20))  # ends inside the metadata (the tokenizer is ~1.5 MB of it)
  return ["--model", path, "--prompt", "hi"]


def _truncated_tensors(tmp_path, request):
  path = tmp_path / "truncated_tensors.gguf"
  with open(request.getfixturevalue("smollm2_gguf"), "rb") as src, open(path, "wb") as dst:
    dst.write(src.read(50 << 20))  # a whole header, then only half the tensor data
  return ["--model", path, "--prompt", "hi"]


def _mistral_dir(tmp_path, request):
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  return ["--model", tmp_path, "--prompt", "hi"]


def _past_context(tmp_path, request):
  return ["--model", request.getfixturevalue("smollm2_gguf"), "--prompt", "hi",
          "--max-new-tokens", 9000]  # SmolLM2's context is 8192


def _empty_prompt(tmp_path, request):
  return ["--model", request.getfixturevalue("smollm2_gguf"), "--prompt", ""]


def _foreign_vocab(tmp_path, request):
  return ["--model", request.getfixturevalue("vocab64_dir"), "--prompt", "Hello world"]


def _prompts_file(content: bytes):
  def build(tmp_path, request):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    return ["--model", request.getfixturevalue("smollm2_gguf"), "--prompts-file", path]
  return build


def _non_utf8_prompt(tmp_path, request):
  # Bytes that are not UTF-8 reach Python's argv as lone surrogates (PEP 383); subprocess
  # encodes them back to the raw byte 0xe9, as a Latin-1 terminal would send it.
  return ["--model", request.getfixturevalue("smollm2_gguf"), "--prompt", "ok", "--prompt",
          os.fsdecode(b"caf\xe9")]


def _no_prompt(tmp_path, request):
  return ["--model", request.getfixturevalue("smollm2_gguf")]


def _flags(*flags):
  """Flags that are wrong whatever the model: refused before it loads (a missing path here)."""
  def build(tmp_path, request):
    return ["--model", tmp_path / "never-read.gguf", "--prompt", "hi", *flags]
  return build


@pytest.fixture(scope="module")
def vocab64_dir(tmp_path_factory, tokenizer):
  """A tiny random Llama with 64 ids next to SmolLM2's tokenizer, whose ids run to 49151."""
  import hf_reference  # noqa: PLC0415 (torch is slow to import; only this case needs it)
  path = tmp_path_factory.mktemp("vocab64")
  hf_reference.tiny_hf_model(vocab_size=64).save_pretrained(path)
  tokenizer.save_hf(path)
  return path


@pytest.mark.parametrize("build,message", [
    (_missing, "no such file"),
    (_garbage_gguf, "not a GGUF file"),
    (_truncated_gguf, "truncated"),
    (_truncated_tensors, "truncated"),
    (_mistral_dir, "is not supported"),
    (_past_context, "exceeds the model's context of 8192"),
    (_empty_prompt, "empty prompt"),
    (_foreign_vocab, "outside the vocabulary [0, 64)"),
    (_prompts_file(b'{"prompt": "ok"}\n{"prompt": "unterminated\n'), "prompts.jsonl:2: not valid"),
    (_prompts_file(b'{"prompt": "ok"}\n["a list"]\n'), "prompts.jsonl:2: expected an object"),
    (_prompts_file(b'{"prompt": 5}\n'), "prompts.jsonl:1: expected an object"),
    (_prompts_file(b'{"prompt": "caf\xe9"}\n'), "not UTF-8"),
    (_non_utf8_prompt, "--prompt #2: not UTF-8 text (byte 0xe9 at character 3)"),
    (_prompts_file(b'{"prompt": "ok"}\n{"prompt": "\\ud800"}\n'),
     "prompts.jsonl:2: not UTF-8 text (lone surrogate U+D800"),
    (_no_prompt, "no prompt given"),
    (_prompts_file(b"\n"), "holds no prompt"),
    (_flags("--seed", "-1"), "--seed -1 is out of range"),
    (_flags("--seed", str(2**32)), "is out of range"),
    (_flags("--temperature", "inf"), "temperature must be a finite number"),
    (_flags("--top-p", "2"), "top_p must be in (0, 1]"),
    (_flags("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (_flags("--gamma", "3"), "add --draft"),
    (_flags("--draft", "ngram", "--gamma", "0"), "--gamma must be >= 1"),
], ids=["missing", "garbage", "truncated-header", "truncated-tensors", "mistral", "past-context",
        "empty-prompt", "foreign-vocab", "bad-json-line", "non-object-line", "non-string-prompt",
        "non-utf8-file", "non-utf8-prompt", "lone-surrogate-in-file", "no-prompt",
        "empty-prompts-file", "negative-seed", "seed-too-big", "infinite-temperature", "top-p",
        "no-new-tokens", "gamma-without-draft", "gamma-0"])
def test_bad_input_is_one_line_error(build, message, tmp_path, request):
  code, out, err = run_cli(*build(tmp_path, request), timeout=60)
  assert "Traceback" not in err, err
  lines = err.splitlines()
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("amd135m.generate: error: "), err
  assert message in lines[0]
  assert out == ""


def test_a_workdir_without_tokenizer_says_so(tmp_path):
  """A run on synthetic tokens leaves no tokenizer: text generation says why it cannot start."""
  from amd135m import tokenizer as tokenizer_lib  # noqa: PLC0415
  from amd135m.errors import UserError  # noqa: PLC0415
  (tmp_path / "model_config.json").write_text("{}")
  with pytest.raises(UserError, match="training workdir without a tokenizer"):
    tokenizer_lib.load_tokenizer(tmp_path)
