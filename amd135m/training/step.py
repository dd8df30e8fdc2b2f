"""The train step: sharded state, token-normalised loss, gradient accumulation, model FLOPs.

State is a plain dict {'step', 'params', 'opt_state'}; the step is a pure function jitted with
in/out shardings by `compile_step`, with the state donated.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amd135m import model as model_lib, sharding
from amd135m.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Logit distillation: the loss per token becomes (1 - weight) * NLL + weight * T^2 *
  KL(teacher || student) at temperature T (Hinton et al.), the teacher's logits cut to the
  student's vocabulary (an id-prefix of the teacher's, as a draft's is of its target's)."""
  config: ModelConfig
  weight: float = 1.0
  temperature: float = 1.0


def token_nll(params, config: ModelConfig, batch: dict, teacher: Teacher | None = None,
              teacher_params=None, *, allow_cpu_kernels: bool = True
              ) -> tuple[jax.Array, jax.Array]:
  """(summed next-token NLL in f32, number of target tokens) of batch {'inputs','targets': [B,T]}
  with an optional 'mask' [B, T] (1 = count the target); with a teacher, the summed
  distillation loss instead. allow_cpu_kernels, here as below: model.forward's; compile_step,
  which traces these sharded, passes False."""
  logits, _ = model_lib.forward(params, config, batch["inputs"],                 # [B, T, V] f32
                                allow_cpu_kernels=allow_cpu_kernels)
  logits = logits.astype(jnp.float32)
  # logsumexp minus the target's logit: no [B, T, V] log-probabilities are written, and the
  # backward is one pass (softmax minus the one-hot), the vocabulary being most of the bytes.
  target_logits = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  loss = jax.nn.logsumexp(logits, axis=-1) - target_logits                        # [B, T]
  if teacher is not None:
    loss = (1.0 - teacher.weight) * loss + teacher.weight * _distillation(
        logits, teacher, teacher_params, batch["inputs"], allow_cpu_kernels=allow_cpu_kernels)
  mask = batch.get("mask")
  mask = jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(loss * mask), jnp.sum(mask)


def _distillation(logits, teacher: Teacher, teacher_params, inputs, *,
                  allow_cpu_kernels: bool) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position, [B, T]."""
  taught, _ = model_lib.forward(teacher_params, teacher.config, inputs,
                                allow_cpu_kernels=allow_cpu_kernels)
  taught = jax.lax.stop_gradient(taught[..., :logits.shape[-1]].astype(jnp.float32))
  t = teacher.temperature
  log_p = jax.nn.log_softmax(taught / t, axis=-1)
  log_q = jax.nn.log_softmax(logits / t, axis=-1)
  return t * t * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def loss_and_grads(params, config: ModelConfig, batch: dict, accum_steps: int,
                   batch_sharding=None, teacher: Teacher | None = None, teacher_params=None, *,
                   allow_cpu_kernels: bool = True):
  """Mean token loss and its gradient over the batch, accumulated over `accum_steps` micro-batches
  with lax.scan. Sums of NLL and gradients are divided by the total token count once, so the result
  equals the one-shot gradient whatever the split (a mean of micro-batch means would weight
  micro-batches with fewer tokens up)."""
  grad_fn = jax.value_and_grad(
      lambda p, c, b: token_nll(p, c, b, teacher, teacher_params,
                                allow_cpu_kernels=allow_cpu_kernels), has_aux=True)
  if accum_steps == 1:
    (nll_sum, count), grads = grad_fn(params, config, batch)
  else:
    # Micro-batch i takes rows i, i + A, i + 2A, ...: splitting [B] as [B / A, A] keeps the rows'
    # device sharding on the leading axis (a split as [A, B / A] would replicate the batch).
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)

    def body(carry, micro_batch):
      if batch_sharding is not None:
        micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_sharding)
      (nll_sum, count), grads = grad_fn(params, config, micro_batch)
      total_nll, total_count, total_grads = carry
      return (total_nll + nll_sum, total_count + count,
              jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (nll_sum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
  count = jnp.maximum(count, 1.0)
  return nll_sum / count, jax.tree.map(lambda g: g / count, grads), count


def train_step(state: dict, batch: dict, teacher_params=None, *, config: ModelConfig, optimizer,
               accum_steps: int, lr_schedule: Callable, batch_sharding=None,
               teacher: Teacher | None = None, allow_cpu_kernels: bool = True
               ) -> tuple[dict, dict]:
  loss, grads, count = loss_and_grads(state["params"], config, batch, accum_steps, batch_sharding,
                                      teacher, teacher_params,
                                      allow_cpu_kernels=allow_cpu_kernels)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "tokens": count, "lr": lr_schedule(state["step"]),
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch: dict, *, config: ModelConfig,
              allow_cpu_kernels: bool = True) -> dict:
  nll_sum, count = token_nll(params, config, batch, allow_cpu_kernels=allow_cpu_kernels)
  return {"nll_sum": nll_sum, "tokens": count}


# ---------------------------------------------------------------------------------------------
# Shardings and compilation.

@dataclasses.dataclass
class Compiled:
  init: Callable        # (rng) -> state, placed
  step: Callable        # (state, batch) -> (state, metrics); state donated
  eval: Callable        # (params, batch) -> {'nll_sum', 'tokens'}
  state_shardings: Any
  batch_sharding: NamedSharding
  mesh: Mesh


def state_shardings(config: ModelConfig, optimizer, mesh: Mesh, rules) -> Any:
  """Shardings of {'step', 'params', 'opt_state'}: parameters by the rule table; optimizer leaves
  shaped like a parameter follow it (Adam's moments); scalars (counts) are replicated."""
  param_specs = sharding.param_specs(model_lib.logical_axes(config), mesh, rules, config)
  abstract_params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  flat_params = jax.tree_util.tree_leaves_with_path(abstract_params)
  param_leaf_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  spec_by_path = {tuple(str(k) for k in path): spec
                  for (path, _), spec in zip(flat_params, param_leaf_specs)}

  def opt_spec(path, leaf):
    # Adam's mu/nu mirror params: their path ends with the parameter's path.
    keys = tuple(str(k) for k in path)
    for length in range(len(keys), 0, -1):
      spec = spec_by_path.get(keys[-length:])
      if spec is not None and len(spec) <= leaf.ndim:
        return spec
    return P()

  opt_specs = jax.tree_util.tree_map_with_path(opt_spec, abstract_opt)
  specs = {"step": P(), "params": param_specs, "opt_state": opt_specs}
  return sharding.named(mesh, specs)


def compile_step(config: ModelConfig, optimizer, lr_schedule, mesh: Mesh, rules,
                 accum_steps: int = 1, init_params: Callable | None = None,
                 teacher: Teacher | None = None, teacher_params=None) -> Compiled:
  """jit-ed init/step/eval with explicit shardings. init_params(rng) -> params overrides the
  random init (fine-tuning from a checkpoint); its output is resharded by out_shardings.
  With a teacher, its params are placed by the same rule table and every step distils from them
  (`Compiled.step` still takes (state, batch)); eval stays the plain next-token NLL."""
  shardings = state_shardings(config, optimizer, mesh, rules)
  batch = sharding.batch_sharding(mesh)
  make_params = init_params or (lambda rng: model_lib.init_params(config, rng))

  def init(rng):
    params = make_params(rng)
    params = jax.tree.map(lambda p: p.astype(config.param_dtype), params)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params)}

  activation_rules = sharding.activation_rules(rules)

  # The CPU kernels take whole arrays: on a one-device mesh (a laptop's or a CI machine's step)
  # the f32 causal attention goes to its kernel (a 135M step on the Intel Xeon 4.3 -> 3.3 s).
  unsharded = mesh.size == 1

  def on_mesh(fn):
    """fn traced with the activation rules and the mesh in context (jit traces at first call)."""
    def wrapped(*args):
      with model_lib.logical_sharding(mesh, activation_rules):
        return fn(*args)
    return wrapped

  step = functools.partial(train_step, config=config, optimizer=optimizer,
                           accum_steps=accum_steps, lr_schedule=lr_schedule,
                           batch_sharding=batch, teacher=teacher, allow_cpu_kernels=unsharded)
  if teacher is None:
    step_fn = jax.jit(on_mesh(step), in_shardings=(shardings, batch),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  else:
    teacher_shardings = sharding.named(mesh, sharding.param_specs(
        model_lib.logical_axes(teacher.config), mesh, rules, teacher.config))
    teacher_params = jax.device_put(teacher_params, teacher_shardings)
    with_teacher = jax.jit(on_mesh(step), in_shardings=(shardings, batch, teacher_shardings),
                           out_shardings=(shardings, sharding.replicated(mesh)),
                           donate_argnums=0)
    step_fn = lambda state, b: with_teacher(state, b, teacher_params)  # noqa: E731
  eval_fn = jax.jit(on_mesh(lambda params, b: eval_step(params, b, config=config,
                                                        allow_cpu_kernels=unsharded)),
                    in_shardings=(shardings["params"], batch),
                    out_shardings=sharding.replicated(mesh))
  return Compiled(init=jax.jit(init, out_shardings=shardings), step=step_fn, eval=eval_fn,
                  state_shardings=shardings, batch_sharding=batch, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# FLOPs, for MFU.

def count_params(config: ModelConfig) -> dict:
  abstract = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  embedding = config.vocab_size * config.dim
  # The input embedding is a lookup, not a matmul; a tied matrix still does the head's matmul.
  non_embedding = total if config.tie_embeddings else total - embedding
  return {"total": total, "matmul": non_embedding}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token: 6N (N without the input embedding) plus attention's
  12 * L * T * d (forward and backward of QK^T and AV over the full T x T, as in PaLM's MFU);
  recomputation under remat is not counted."""
  n = count_params(config)["matmul"]
  return 6.0 * n + 12.0 * config.n_layers * seq_len * config.dim
