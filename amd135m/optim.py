"""AdamW with warmup + cosine decay, global-norm clipping and a configurable weight-decay mask."""
import jax
import optax

from amd135m.errors import UserError

# Which parameters weight decay touches. AMD-135M follows TinyLlama's pretraining script, which
# hands every parameter to torch's AdamW (decay on all); 'matrices' spares the norm scales,
# 'kernels' also spares the embeddings, as many recipes (nanoGPT, MaxText) do.
DECAY_MASKS = ("all", "matrices", "kernels")


def schedule(lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine to end_lr at total_steps."""
  if total_steps < 1 or warmup_steps < 0:
    raise UserError(f"total_steps ({total_steps}) must be >= 1 and warmup_steps "
                    f"({warmup_steps}) >= 0")
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def decay_mask(params, kind: str):
  if kind not in DECAY_MASKS:
    raise UserError(f"weight_decay_mask {kind!r}: choose one of {list(DECAY_MASKS)}")

  def decays(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if kind == "all":
      return True
    if kind == "matrices":
      return leaf.ndim >= 2
    return name == "kernel"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """From a training config (lr, end_lr, warmup_steps, total_steps, b1, b2, eps, weight_decay,
  weight_decay_mask, grad_clip)."""
  lr = schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay,
                           mask=lambda p: decay_mask(p, config.weight_decay_mask)))
  return optax.chain(*parts)
