"""python -m amd135m.convert: streams in bounded memory, fails in one line, never half-writes."""
import json
import pathlib
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from amd135m import convert
from amd135m.checkpoints import (
  TensorSpec,
  convert_checkpoint,
  hf_shapes,
  iter_hf_tensors,
  read_header,
  save_hf,
)
from amd135m.checkpoints.hf import config_json
from amd135m.checkpoints.safetensors_io import ShardedWriter
from amd135m.errors import UserError
from amd135m.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
CLI = [sys.executable, "-m", "amd135m.convert"]
# A fresh wrapper process, so RUSAGE_CHILDREN's peak is the converter's alone (not earlier
# children of pytest, nor the pytest process a fork would start from).
_PEAK_RSS = ("import json, resource, subprocess, sys\n"
             "run = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
             "print(json.dumps({'rc': run.returncode, 'stdout': run.stdout, "
             "'stderr': run.stderr, 'peak_rss': peak}))\n")


def start_measured(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", _PEAK_RSS, *CLI, *args], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)


def finish_measured(proc: subprocess.Popen) -> dict:
  stdout, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  return json.loads(stdout)


def write_constant_checkpoint(directory: pathlib.Path, config: ModelConfig,
                              max_shard_bytes: int) -> None:
  """A bf16 HF directory where tensor i is filled with i / 8: big, but written in seconds."""
  directory.mkdir(parents=True)
  specs = {name: TensorSpec(shape, BF16) for name, shape in hf_shapes(config).items()}
  with ShardedWriter(directory, specs, max_shard_bytes) as writer:
    for i, (name, spec) in enumerate(specs.items()):
      writer.write(name, np.full(spec.shape, i / 8, BF16))
  (directory / "config.json").write_text(json.dumps(config_json(config, "bfloat16")))


# 8 layers of d=2048, ffn=8192, vocab 32000, untied: 618M params, 1.24 GB in bf16.
BIG = ModelConfig(vocab_size=32000, dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=8192)
TINY = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)


def test_convert_streams_a_large_checkpoint_in_bounded_memory(tmp_path):
  big_in, big_out = tmp_path / "big", tmp_path / "big_out"
  try:
    # Same command on a tiny model: interpreter, imports, argument parsing, progress bar.
    write_constant_checkpoint(tmp_path / "tiny", TINY, max_shard_bytes=10**9)
    baseline = start_measured("--input", str(tmp_path / "tiny"), "--output", str(tmp_path / "t"))
    write_constant_checkpoint(big_in, BIG, max_shard_bytes=400 * 10**6)  # meanwhile
    checkpoint_bytes = sum(f.stat().st_size for f in big_in.glob("*.safetensors"))
    largest = max(spec.nbytes for spec in iter_hf_tensors(big_in).specs.values())
    baseline = finish_measured(baseline)
    assert baseline["rc"] == 0, baseline["stderr"]
    measured = finish_measured(start_measured("--input", str(big_in), "--output", str(big_out),
                                              "--dtype", "bfloat16"))
    assert measured["rc"] == 0, measured["stderr"]
    n_params = sum(int(np.prod(shape)) for shape in hf_shapes(BIG).values())
    assert f"{n_params / 1e6:.1f}M params, bfloat16" in measured["stdout"]

    # Streaming holds one tensor read buffer; a cast would add a second copy, and we allow a
    # third for allocator slack. Loading the checkpoint whole would exceed this by ~0.9 GB.
    bound = baseline["peak_rss"] + 3 * largest
    assert 3 * largest < checkpoint_bytes / 3  # so the bound can tell streaming from loading
    extra_mb = (measured["peak_rss"] - baseline["peak_rss"]) / 1e6
    assert measured["peak_rss"] < bound, (
        f"peak RSS {measured['peak_rss'] / 1e6:.0f} MB = baseline "
        f"{baseline['peak_rss'] / 1e6:.0f} MB + {extra_mb:.0f} MB; bound {bound / 1e6:.0f} MB "
        f"for a {checkpoint_bytes / 1e6:.0f} MB checkpoint")

    written = {}
    for shard in big_out.glob("*.safetensors"):
      written.update(read_header(shard))
    assert set(written) == set(hf_shapes(BIG))
    assert all(entry.spec.dtype == BF16 for entry in written.values())
    assert sum(f.stat().st_size for f in big_out.glob("*.safetensors")) == pytest.approx(
        checkpoint_bytes, rel=1e-3)
    names = list(hf_shapes(BIG))
    for i in (0, 7, len(names) - 1):  # embedding, a layer's matrix, lm_head
      values = written[names[i]].read()
      assert values.dtype == BF16 and np.all(values == BF16.type(i / 8)), names[i]
  finally:
    shutil.rmtree(big_in, ignore_errors=True)  # 2.7 GB: do not leave it to pytest's tmp rotation
    shutil.rmtree(big_out, ignore_errors=True)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, smollm2_gguf) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("bad")
  with open(smollm2_gguf, "rb") as f:
    (root / "truncated.gguf").write_bytes(f.read(50 << 20))  # header intact, tensors cut off
  (root / "gpt2").mkdir()
  (root / "gpt2" / "config.json").write_text(json.dumps(
      {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768}))
  return {"missing": root / "no-such-model", "truncated gguf": root / "truncated.gguf",
          "gpt2 config": root / "gpt2"}


def _check_one_line_error(returncode: int, stdout: str, stderr: str, expected: str,
                          output: pathlib.Path) -> None:
  assert returncode == 2, stderr
  assert stdout == ""
  assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
  assert stderr.startswith("amd135m.convert: error: ") and expected in stderr, stderr
  assert not output.exists()
  assert not output.parent.exists() or not list(output.parent.glob(f".{output.name}.staging-*"))


EXPECTED_ERRORS = {"missing": "no such file or directory", "truncated gguf": "truncated",
                   "gpt2 config": "model_type 'gpt2'"}


def test_cli_process_fails_in_one_line(bad_inputs, tmp_path):
  # The real entry point in a fresh interpreter, for the input that fails deepest (in a tensor).
  output = tmp_path / "out"
  run = subprocess.run([*CLI, "--input", str(bad_inputs["truncated gguf"]), "--output",
                        str(output)], cwd=ROOT, capture_output=True, text=True)
  _check_one_line_error(run.returncode, run.stdout, run.stderr, "truncated", output)


@pytest.mark.parametrize("case", list(EXPECTED_ERRORS))
def test_cli_bad_inputs_fail_in_one_line(bad_inputs, tmp_path, capsys, case):
  output = tmp_path / "out"
  returncode = convert.main(["--input", str(bad_inputs[case]), "--output", str(output)])
  captured = capsys.readouterr()
  _check_one_line_error(returncode, captured.out, captured.err, EXPECTED_ERRORS[case], output)


def test_cli_unwritable_output_fails_in_one_line(smollm2_gguf, tmp_path, capsys):
  in_the_way = tmp_path / "a_file"
  in_the_way.write_text("")
  output = in_the_way / "out"  # its parent is a file
  returncode = convert.main(["--input", str(smollm2_gguf), "--output", str(output)])
  captured = capsys.readouterr()
  _check_one_line_error(returncode, captured.out, captured.err, "cannot create it", output)


def test_cli_converts_smollm2_gguf_to_a_transformers_directory(smollm2_gguf, tmp_path, capsys):
  out = tmp_path / "smollm2"
  assert convert.main(["--input", str(smollm2_gguf), "--output", str(out),
                       "--dtype", "bfloat16"]) == 0
  summary = capsys.readouterr().out.strip().splitlines()
  assert len(summary) == 1 and "272 tensors, 134.5M params, bfloat16" in summary[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no staging left behind

  model = transformers.LlamaForCausalLM.from_pretrained(out)
  assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
  assert model.config.rope_parameters["rope_theta"] == 100000.0
  state = model.state_dict()
  ours = iter_hf_tensors(smollm2_gguf, dtype="bfloat16")
  assert set(state) == set(ours.specs) | {"lm_head.weight"}
  # A sample (all were checked against transformers in test_checkpoints): rotary rows, a norm.
  for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.29.self_attn.k_proj.weight", "model.layers.7.input_layernorm.weight"):
    np.testing.assert_array_equal(state[name].float().numpy(), ours.read(name).astype(np.float32),
                                  name)


def test_interrupted_convert_leaves_nothing(tmp_path):
  source = tmp_path / "src"
  save_hf(source, TINY, {name: np.zeros(shape, np.float32)
                         for name, shape in hf_shapes(TINY).items()})

  def interrupt_after_three(tensors, total):
    for i, item in enumerate(tensors):
      if i == 3:
        raise KeyboardInterrupt
      yield item

  with pytest.raises(KeyboardInterrupt):
    convert_checkpoint(source, tmp_path / "out", progress=interrupt_after_three)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="already exists"):
    convert_checkpoint(source, tmp_path / "taken")
  assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
  (tmp_path / "empty").mkdir()  # an empty directory is fine to fill
  convert_checkpoint(source, tmp_path / "empty")
  assert (tmp_path / "empty" / "model.safetensors").exists()


def test_convert_never_touches_a_path_the_user_did_not_name(tmp_path):
  # `<output>.partial` used to be the staging path, removed before every run: a user's own
  # folder of that name lost its files. Staging is now a fresh mkdtemp directory.
  source = tmp_path / "src"
  save_hf(source, TINY, {name: np.zeros(shape, np.float32)
                         for name, shape in hf_shapes(TINY).items()})
  mine = tmp_path / "out.partial"
  mine.mkdir()
  (mine / "n.txt").write_text("x")
  run = subprocess.run([*CLI, "--input", str(source), "--output", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert (mine / "n.txt").read_text() == "x" and [p.name for p in mine.iterdir()] == ["n.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial", "src"]
  # The output has the umask's mode, like any directory the user makes, not mkdtemp's 0700.
  assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "src").stat().st_mode & 0o777


def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(smollm2_gguf, tmp_path,
                                                                    monkeypatch, capsys):
  import errno

  from amd135m.checkpoints import export

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(export, "save_hf", full)
  out = tmp_path / "out"
  assert convert.main(["--input", str(smollm2_gguf), "--output", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no space left on device" in err[0] and str(out) in err[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging directory
