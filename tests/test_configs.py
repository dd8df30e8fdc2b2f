"""Every experiment config resolves, with and without runlocal, to a ModelConfig."""
import pathlib
import re

import pytest

from amd135m import config_lib
from amd135m.errors import UserError

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))

EXPECTED = {  # the published architectures
    "amd_llama_135m": (32000, 768, 12, 12, 12, 2048, 10000.0, False),
    "codellama_7b": (32016, 4096, 32, 32, 32, 11008, 1e6, False),
    "smollm2_135m": (49152, 576, 30, 9, 3, 1536, 100000.0, True),
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_config_resolves(path, arg):
  config = config_lib.load(f"{path}{arg}")
  model = config_lib.model_config(config.model)
  assert model.dim % model.n_heads == 0 and model.n_heads % model.n_kv_heads == 0
  if path.stem in EXPECTED and not arg:
    assert (model.vocab_size, model.dim, model.n_layers, model.n_heads, model.n_kv_heads,
            model.ffn_dim, model.rope_theta, model.tie_embeddings) == EXPECTED[path.stem]


def test_bad_config_arguments_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="unknown config argument 'nope'"):
    config_lib.load(f"{CONFIGS[0]}:nope")
  with pytest.raises(UserError, match="not found"):
    config_lib.load(str(tmp_path / "missing.py"))


def test_config_file_mistakes_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="config argument vocab_size=abc: expected an int"):
    config_lib.load(f"{CONFIGS[0].parent / 'tiny.py'}:vocab_size=abc")
  weights = tmp_path / "model.gguf"
  weights.write_bytes(b"GGUF")
  with pytest.raises(UserError, match=r"not a \.py file.*--config\.init_from"):
    config_lib.load(str(weights))
  no_function = tmp_path / "settings.py"
  no_function.write_text("lr = 1e-3\n")
  with pytest.raises(UserError, match=r"defines no get_config\(arg\)"):
    config_lib.load(str(no_function))


def test_override_type_errors_name_the_flag_and_type():
  config = config_lib.load(str(CONFIGS[0].parent / "tiny.py"))
  for item, message in [("batch_size=x", "--config.batch_size=x: expected an int"),
                        ("lr=fast", "--config.lr=fast: expected a float"),
                        ("data.shuffle=maybe", "--config.data.shuffle=maybe: expected one of true, "
                         "false, 1, 0, yes, no (any case)")]:
    with pytest.raises(UserError, match=re.escape(message)):
      config_lib.apply_overrides(config, [item])


DRAFT = CONFIGS[0].parent / "draft.py"


@pytest.mark.parametrize("arg, message", [
    # A bare argument used to become True whatever its type: `steps` trained one step.
    ("steps", "config argument steps: expected an int; write steps=VALUE"),
    ("stage", "config argument stage: expected a string; write stage=VALUE"),
    ("steps=2.5", "config argument steps=2.5: expected an int"),
    # A lenient bool read every unknown word as false: runlocal=ture ran the full config.
    ("runlocal=ture", "config argument runlocal=ture: expected one of true, false, 1, 0, yes, no"),
    ("runlocal=", "config argument runlocal=: expected one of"),
])
def test_config_arguments_are_parsed_by_their_declared_type(arg, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.load(f"{DRAFT}:{arg}")


def test_config_arguments_that_fit_their_type():
  parsed = config_lib.parse_arg("steps=1e3,runlocal,on=No,lr=3,name=", steps=0, runlocal=False,
                                on=True, lr=0.1, name="x")
  assert parsed.to_dict() == dict(steps=1000, runlocal=True, on=False, lr=3.0, name="")
  assert type(parsed.lr) is float
  # A 20-digit int survives whole (a detour through float would round it).
  assert config_lib.parse_arg("seed=12345678901234567891", seed=0).seed == 12345678901234567891
  assert config_lib.load(f"{DRAFT}:steps=7,runlocal=YES").total_steps == 7


@pytest.mark.parametrize("override, message", [
    ("n_heads=5", "--config.model.n_heads 5 does not divide --config.model.dim 64"),
    ("n_kv_heads=3", "--config.model.n_kv_heads 3 does not divide --config.model.n_heads 4"),
    ("n_heads=64", "dim / n_heads = 1 is odd"),
    ("attention=bogus", "--config.model.attention=bogus: choose one of einsum, cudnn"),
    ("remat=bogus", "--config.model.remat=bogus: choose one of none, dots, full"),
    ("dtype=int8", "--config.model.dtype=int8: choose one of float32, bfloat16, float16"),
    ("param_dtype=float64", "--config.model.param_dtype=float64: choose one of"),
    ("dim=0", "--config.model.dim must be an int >= 1, got 0"),
    ("n_layers=-1", "--config.model.n_layers must be an int >= 1, got -1"),
    ("vocab_size=0", "--config.model.vocab_size must be an int >= 1"),
    ("rope_theta=0", "--config.model.rope_theta must be > 0"),
])
def test_bad_model_fields_are_user_errors_naming_the_flag(override, message):
  config = config_lib.load(str(CONFIGS[0].parent / "tiny.py"))
  config_lib.apply_overrides(config, [f"model.{override}"])
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.model_config(config.model)
