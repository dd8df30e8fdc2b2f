"""Every experiment config resolves, with and without runlocal, to a ModelConfig."""
import pathlib

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
