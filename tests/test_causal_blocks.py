"""Training's attention by causal query blocks (T >= 128) still equals transformers: XLA's
blocked form, and cpu_kernels' kernel (64 x 64 blocks) that one-device CPU steps take."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference
from amd135m.checkpoints import layout
from amd135m.training import step as step_lib


@pytest.mark.parametrize("allow_cpu_kernels", [False, True])
def test_blocked_causal_attention_loss_and_gradients_equal_transformers(allow_cpu_kernels):
  hf_model = hf_reference.tiny_hf_model(seed=5, init_std=0.1).train()
  config = hf_reference.our_config(hf_model)
  params = jax.tree.map(jnp.asarray, hf_reference.our_params(hf_model))
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 257))  # T=256: 4 blocks
  inputs = torch.as_tensor(tokens)
  logits = hf_model(inputs[:, :-1]).logits.float()
  hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              inputs[:, 1:].reshape(-1))
  hf_loss.backward()
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss, grads, _ = jax.jit(lambda p, b: step_lib.loss_and_grads(
      p, config, b, 1, allow_cpu_kernels=allow_cpu_kernels))(params, batch)
  np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-5)
  ours = layout.flatten_params(jax.device_get(grads))
  for name, p in hf_model.named_parameters():
    np.testing.assert_allclose(ours[name], p.grad.float().numpy(), rtol=1e-4, atol=1e-6,
                               err_msg=name)
