"""The train step: sharded equals unsharded, it really shards, and it matches transformers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference
from amd135m import config_lib, optim, sharding
from amd135m.checkpoints import layout
from amd135m.errors import UserError
from amd135m.training import step as step_lib


def _compiled(config, mesh_shape, devices):
  model_config = config_lib.model_config(config.model)
  mesh = sharding.make_mesh(mesh_shape, devices)
  schedule = optim.schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
  return step_lib.compile_step(model_config, optim.make_optimizer(config), schedule, mesh,
                               sharding.parse_rules(config.sharding_rules), config.grad_accum)


def _batch(config, seed=0):
  tokens = np.random.default_rng(seed).integers(
      0, config.model.vocab_size, (config.batch_size, config.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _place(compiled, batch):
  return {k: jax.device_put(v, compiled.batch_sharding) for k, v in batch.items()}


def _param_bytes_on(state, device) -> int:
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state["params"])
             for shard in leaf.addressable_shards if shard.device == device)


def _single_and_sharded(config, steps: int = 3):
  """`steps` steps on one device and on a data x fsdp x tensor mesh of 8: (states, losses)."""
  single = _compiled(config, {"data": 1}, jax.devices()[:1])
  sharded = _compiled(config, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  states = [c.init(jax.random.key(0)) for c in (single, sharded)]
  losses = [[], []]
  for step in range(steps):
    batch = _batch(config, step)
    for k, c in enumerate((single, sharded)):
      states[k], metrics = c.step(states[k], _place(c, batch))
      losses[k].append(float(metrics["loss"]))
  return states, losses


def test_sharded_step_equals_single_device_and_shards_the_parameters():
  config = config_lib.load("configs/tiny.py")
  config.batch_size, config.data.seq_len, config.warmup_steps = 8, 32, 1
  states, losses = _single_and_sharded(config)
  # Same math, different reduction order across devices: f32 rounding only.
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[1]["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-5)

  total = _param_bytes_on(states[0], jax.devices()[0])
  per_device = _param_bytes_on(states[1], jax.devices()[0])
  # Matrices split over fsdp x tensor = 4; norm scales only over fsdp (a small share).
  assert 0.25 <= per_device / total < 0.27, (per_device, total)
  adam_mu = states[1]["opt_state"][1][0].mu["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert adam_mu.addressable_shards[0].data.shape == (32, 64)  # [64, 128] / (fsdp 2, tensor 2)


def test_a_bf16_sharded_step_equals_single_device():
  """bf16 compute (precision.einsum's products and their custom backward, the causal blocks'
  f32 gradient sums) on a data x fsdp x tensor mesh: the single device's losses, up to the
  reduction order (2e-6 relative at the third step, measured)."""
  config = config_lib.load("configs/tiny.py")
  config.batch_size, config.data.seq_len, config.warmup_steps = 8, 128, 1
  config.model.dtype = "bfloat16"
  _, losses = _single_and_sharded(config)
  np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5)


def test_gradient_accumulation_equals_one_big_batch():
  config = config_lib.load("configs/tiny.py")
  config.batch_size, config.data.seq_len = 8, 16
  model_config = config_lib.model_config(config.model)
  params = step_lib.model_lib.init_params(model_config, jax.random.key(1))
  batch = _batch(config)
  batch["mask"] = (np.arange(16)[None, :] < np.array([16, 3, 9, 16, 1, 16, 7, 12])[:, None])
  outputs = [jax.jit(lambda p, b, a=a: step_lib.loss_and_grads(p, model_config, b, a))(
      params, batch) for a in (1, 4)]
  np.testing.assert_allclose(float(outputs[1][0]), float(outputs[0][0]), rtol=1e-6)
  for g1, g4 in zip(jax.tree.leaves(outputs[0][1]), jax.tree.leaves(outputs[1][1])):
    np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), atol=1e-7, rtol=1e-5)


def test_a_split_head_is_an_error_unless_the_rule_replicates_it(smollm2):
  model_config = smollm2[0]
  mesh = sharding.make_mesh({"data": 4, "tensor": 2}, jax.devices()[:8])
  logical = step_lib.model_lib.logical_axes(model_config)
  with pytest.raises(UserError, match=r"kv_heads \(3\) does not divide over mesh axis tensor.*"
                                      r"sharding_rules='kv_heads=replicate'"):
    sharding.param_specs(logical, mesh, sharding.parse_rules(""), model_config)
  with pytest.raises(UserError, match=r"self_attn/o_proj/kernel: heads \(9\) does not divide"):
    sharding.param_specs(logical, mesh, sharding.parse_rules("kv_heads=replicate"), model_config)
  specs = sharding.param_specs(logical, mesh, sharding.parse_rules(
      "heads=replicate,kv_heads=replicate"), model_config)
  assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
      None, None)
  assert specs["layers_0"]["mlp"]["up_proj"]["kernel"] == jax.sharding.PartitionSpec(
      None, "tensor")


def _hf_loss_and_grads(hf_model, tokens, dtype=torch.float32):
  """(loss, {hf_name: gradient}) of transformers' model, its loss taken in `dtype`."""
  hf_model.zero_grad()
  inputs = torch.as_tensor(tokens)
  loss = hf_model(inputs[:, :-1], labels=None).logits.to(dtype)
  loss = torch.nn.functional.cross_entropy(loss.reshape(-1, loss.shape[-1]),
                                           inputs[:, 1:].reshape(-1))
  loss.backward()
  grads = {name: p.grad.detach().numpy() for name, p in hf_model.named_parameters()}
  hf_model.zero_grad()  # to None: the arrays keep their storage, a later cast cannot touch it
  return loss.item(), grads


def _compare_with_transformers(hf_model, config, params, tokens, rtol, atol):
  hf_loss, hf_grads = _hf_loss_and_grads(hf_model, tokens)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss, grads, _ = jax.jit(lambda p, b: step_lib.loss_and_grads(p, config, b, 1))(params, batch)
  np.testing.assert_allclose(float(loss), hf_loss, rtol=1e-5)
  ours = layout.flatten_params(jax.device_get(grads))
  if config.tie_embeddings:
    hf_grads.pop("lm_head.weight", None)
  assert set(ours) == set(hf_grads)
  for name, reference in hf_grads.items():
    np.testing.assert_allclose(ours[name], reference, rtol=rtol, atol=atol, err_msg=name)


def test_loss_and_gradients_equal_transformers_on_a_random_tiny_llama():
  hf_model = hf_reference.tiny_hf_model(seed=3, init_std=0.1).train()
  config = hf_reference.our_config(hf_model)
  params = jax.tree.map(jnp.asarray, hf_reference.our_params(hf_model))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 33))
  _compare_with_transformers(hf_model, config, params, tokens, rtol=1e-4, atol=1e-6)


# Ours may be this many times further from float64 than transformers' own float32 result is.
# Measured here (x86, AVX2): at most 0.6x by RMS and 1.3x by max over every gradient tensor,
# so 4x leaves room for other CPUs' kernels (AVX-512, other summation orders).
F32_ERROR_FACTOR = 4
# Plus 8 ulps of the tensor's own scale: rounding alone puts any float32 result up to half an
# ulp from float64, so where transformers happens to land that close, 4x its error would ask
# for more than float32 holds.
F32_FLOOR = 8 * float(np.finfo(np.float32).eps)


def test_loss_and_gradients_equal_transformers_on_real_smollm2(smollm2, smollm2_hf, smollm2_gguf):
  """Ours (JAX, float32) is as close to the float64 truth as transformers in float32 is.

  A fixed atol against transformers' float32 result bounds the sum of two float32 errors, whose
  size depends on the CPU's kernels: 2e-5 failed at 5.4e-5 (layers.0 v_proj) on some CPUs. Both
  are measured against transformers in float64 on the same weights instead, per tensor, by RMS
  and by max. (transformers takes rotary angles in float32 even then: one rounding, far below
  what 30 float32 layers accumulate.)"""
  from amd135m.tokenizer import load_tokenizer
  config, params = smollm2
  text = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles")
  tokens = np.asarray([load_tokenizer(smollm2_gguf).encode(text)[:48]])
  hf_loss, hf_grads = _hf_loss_and_grads(smollm2_hf.train(), tokens)
  # transformers refuses .double() on a GGUF-loaded model; nn.Module's own cast is exact both
  # ways (f32 -> f64 -> f32), so the session's shared model comes back bitwise unchanged.
  torch.nn.Module.double(smollm2_hf)
  try:
    exact_loss, exact_grads = _hf_loss_and_grads(smollm2_hf, tokens, torch.float64)
  finally:
    torch.nn.Module.float(smollm2_hf).eval()
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss, grads, _ = jax.jit(lambda p, b: step_lib.loss_and_grads(p, config, b, 1))(params, batch)
  ours = layout.flatten_params(jax.device_get(grads))
  if config.tie_embeddings:
    exact_grads.pop("lm_head.weight", None)
  assert set(ours) == set(exact_grads)

  measured = {"loss": (float(loss), hf_loss, exact_loss)}  # (ours, transformers f32, f64)
  measured.update({name: (ours[name], hf_grads[name], exact)
                   for name, exact in exact_grads.items()})
  worse = []
  for name, (ours_value, hf_value, exact) in measured.items():
    exact = np.ravel(exact)
    ours_error, hf_error = np.ravel(ours_value) - exact, np.ravel(hf_value) - exact  # float64
    for norm_name, norm in (("rms", lambda x: np.linalg.norm(x) / np.sqrt(x.size)),
                            ("max", lambda x: max(x.max(), -x.min()))):
      bound = F32_ERROR_FACTOR * norm(hf_error) + F32_FLOOR * norm(exact)
      if not norm(ours_error) <= bound:
        worse.append(f"{name} ({norm_name}): ours {norm(ours_error):.3g} from float64, "
                     f"transformers {norm(hf_error):.3g}, bound {bound:.3g}")
  assert not worse, "\n".join(worse)


# ---------------------------------------------------------------------------------------------
# Logit distillation (config.distill).

def _tiny_pair(teacher_vocab: int):
  """A tiny student and a teacher with a larger vocabulary, random weights each."""
  from amd135m import model as model_lib  # noqa: PLC0415
  config = config_lib.load("configs/tiny.py")
  config.batch_size, config.data.seq_len = 2, 16
  student = config_lib.model_config(config.model)
  teacher = dataclasses.replace(student, vocab_size=teacher_vocab, n_layers=1)
  return (config, student, model_lib.init_params(student, jax.random.key(1)), teacher,
          model_lib.init_params(teacher, jax.random.key(2)))


def test_distillation_loss_is_the_tempered_kl_mixed_with_the_nll():
  from amd135m import model as model_lib  # noqa: PLC0415
  config, student, params, teacher_config, teacher_params = _tiny_pair(600)
  batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
  nll, count = step_lib.token_nll(params, student, batch)
  for weight, temperature in ((0.0, 1.0), (1.0, 1.0), (0.3, 2.0)):
    teacher = step_lib.Teacher(teacher_config, weight, temperature)
    loss, _ = step_lib.token_nll(params, student, batch, teacher, teacher_params)
    s = np.asarray(model_lib.forward(params, student, batch["inputs"])[0], np.float64)
    t = np.asarray(model_lib.forward(teacher_params, teacher_config, batch["inputs"])[0],
                   np.float64)[..., :student.vocab_size]  # the student's ids: a prefix
    log_p = t / temperature - np.log(np.exp(t / temperature).sum(-1, keepdims=True))
    log_q = s / temperature - np.log(np.exp(s / temperature).sum(-1, keepdims=True))
    kl = temperature ** 2 * (np.exp(log_p) * (log_p - log_q)).sum(-1).sum()
    expected = (1 - weight) * float(nll) + weight * kl
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  assert float(count) == config.batch_size * config.data.seq_len


def test_a_student_equal_to_its_teacher_gets_no_gradient():
  config, student, params, _, _ = _tiny_pair(600)
  batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
  teacher = step_lib.Teacher(student, weight=1.0, temperature=2.0)
  loss, grads, _ = step_lib.loss_and_grads(params, student, batch, 1, None, teacher, params)
  assert abs(float(loss)) < 1e-5
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5
