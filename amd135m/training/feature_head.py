"""Trains a feature draft head for a target (amd135m.feature_draft): collect, vocabulary, train.

`train_head` is what `python -m amd135m.draft_head train` (the face) and the reproduction call.

1. Collect: the target continues prompts made from the local corpora (stdlib function headers and
   docstrings, Gutenberg passages; nothing from HumanEval), greedily, to `seq_len` tokens; for
   every position we keep its hidden states at the draft's depths and the top of its next-token
   distribution (ids and log-probabilities). Chunks of rows land in DIR/data/ one file at a time.
2. Vocabulary: the K ids the target most often predicts or reads in that data (FR-Spec's
   frequency-ranked vocabulary), in DIR/vocab.npy.
3. Train: the head's cross-entropy against the target's distribution (over the K ids), unrolled
   over `unroll` draft steps on its own hidden states (EAGLE-3's training-time test), with AdamW;
   orbax checkpoints, metrics.jsonl, a progress bar. A rerun with --resume continues where a
   kill -9 left it, bitwise as if never interrupted.

--minutes M bounds the whole job's wall time: collection takes `collect_share` of it, and the
training schedule is sized, after its first steps are timed, to end inside the rest.
"""
import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amd135m import (
  checkpoints,
  cpu_kernels,
  feature_draft,
  metrics as metrics_lib,
  model as model_lib,
  quantize,
  sampling,
)
from amd135m.checkpoints import head_io, orbax_io
from amd135m.errors import UserError, make_dir
from amd135m.paths import COMPLETE

DATA_DIR = "data"
SETTINGS_FILE = "train_settings.json"
SCHEDULE_FILE = "schedule.json"


COMPUTE = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a head is collected for and trained; saved in the workdir and fixed once written."""
  layers: str = "eagle3"       # 'eagle3' (low, middle, high), 'last', or depths 'I,J,K'
  vocab: int = 4096            # K, the head's output ids (docs/RESULTS.md: 4096 or 8192)
  seq_len: int = 256           # tokens per collected row (prompt + the target's continuation)
  prompt_tokens: int = 96      # prompts are cut to at most this many tokens
  collect_batch: int = 32      # rows the target continues at once (32: ~180 positions a second
                               # on a 2-core Zen 4, against ~110 at 8 and ~170 at 64)
  top_k: int = 8               # of the target's next-token distribution kept per position
  code_every: int = 4          # of every N prompts, N - 1 are stdlib headers, one Gutenberg
  generate_every: int = 1      # of every N chunks, one is the target's own continuations of
                               # short prompts, the rest whole stdlib functions / Gutenberg
                               # passages read as they are (a prefill: ~3x cheaper a position);
                               # 0: read text only, the target generates nothing
  batch: int = 8               # rows per training step
  unroll: int = 2              # draft steps trained per position (training-time test)
  lr: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.0
  clip: float = 0.5
  feature_weight: float = 0.0  # EAGLE's regression of h onto the next position's features
  collect_share: float = 0.4   # of --minutes spent collecting
  compute: str = "auto"        # the head's products during training: float32, bfloat16 (f32
                               # weights and sums, bf16 inputs), or auto: bfloat16 on CPUs with
                               # bf16 dot instructions (a step 0.75 -> 0.55 s on the Intel Xeon)
  eval_rows: int = 16          # held-out rows for the agreement metrics
  seed: int = 0

  def compute_dtype(self) -> str:
    """`compute` resolved for this host."""
    if self.compute != "auto":
      return self.compute
    native = jax.default_backend() == "cpu" and cpu_kernels.native_bf16_dot()
    return "bfloat16" if native else "float32"

  def check(self, target_vocab: int) -> None:
    for name in ("vocab", "seq_len", "prompt_tokens", "collect_batch", "top_k", "batch",
                 "unroll", "eval_rows"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    if self.compute not in COMPUTE:
      raise UserError(f"--compute {self.compute}: choose one of {', '.join(COMPUTE)}")
    if self.generate_every < 0:
      raise UserError(f"--generate-every must be >= 0 (0: read text only), got "
                      f"{self.generate_every}")
    if self.vocab > target_vocab:
      raise UserError(f"--vocab {self.vocab} is larger than the target's vocabulary of "
                      f"{target_vocab}: choose K <= {target_vocab}")
    if self.prompt_tokens >= self.seq_len:
      raise UserError(f"--prompt-tokens {self.prompt_tokens} leaves no room for the target's "
                      f"continuation in --seq-len {self.seq_len}")
    if not 0 < self.collect_share < 1:
      raise UserError(f"collect_share must be in (0, 1), got {self.collect_share}")
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise UserError(f"--lr must be a finite number > 0, got {self.lr}")


def resolve_layers(spec: str, n_layers: int) -> tuple[int, ...]:
  """'eagle3' -> EAGLE-3's low/middle/high depths; 'last' -> (n_layers,); 'I,J' -> (I, J)."""
  if spec == "eagle3":
    return feature_draft.eagle3_layers(n_layers)
  if spec == "last":
    return (n_layers,)
  try:
    layers = tuple(int(x) for x in spec.split(","))
  except ValueError:
    raise UserError(f"--layers {spec}: give eagle3, last, or depths like 2,15,27") from None
  if not layers or any(not 0 <= i <= n_layers for i in layers):
    raise UserError(f"--layers {spec}: depths run from 0 (embeddings) to {n_layers}")
  return layers


# ---------------------------------------------------------------------------------------------
# 1. Collection.

@functools.partial(jax.jit, static_argnames=("config", "layers", "seq_len", "top_k"))
def _collect(params, config: model_lib.ModelConfig, tokens, lens, layers: tuple[int, ...],
             seq_len: int, top_k: int):
  """Greedy continuations of right-padded prompts tokens [B, P] (lens [B]) until every row holds
  seq_len tokens, with the hidden states and top-k next-token log-probabilities at every position.

  Returns prompt_* [B, P, ...] for the prompt positions and new_* [B, seq_len, ...] indexed by
  decode step s (position lens[b] + s), and the new tokens new_ids [B, seq_len]."""
  batch, width = tokens.shape

  def top_in_loop(logits):  # [B, V]
    return top_k_by_chunks(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True), top_k)

  logits, cache, hidden = model_lib.prefill(params, config, tokens, width + seq_len,
                                            hidden_layers=layers)
  prompt_ids, prompt_logp = _top_k(logits, top_k)
  first = jnp.take_along_axis(prompt_ids[..., 0], (lens - 1)[:, None], axis=1)[:, 0]
  cache = cache.replace(length=lens)
  steps = seq_len - jnp.min(lens)
  features = hidden.shape[-1]
  buffers = (jnp.zeros((batch, seq_len), jnp.int32),
             jnp.zeros((batch, seq_len, features), jnp.float32),
             jnp.zeros((batch, seq_len, top_k), jnp.int32),
             jnp.zeros((batch, seq_len, top_k), jnp.float32))

  def body(carry):
    s, cache, token, (new_ids, new_hidden, new_top, new_logp) = carry
    logits, cache, hidden = model_lib.forward_with_hidden(params, config, token[:, None], cache,
                                                          layers)
    ids, logp = top_in_loop(logits[:, 0])
    update = lambda buf, value: jax.lax.dynamic_update_slice_in_dim(buf, value[:, None], s, 1)
    buffers = (update(new_ids, token), update(new_hidden, hidden[:, 0]), update(new_top, ids),
               update(new_logp, logp))
    return s + 1, cache, ids[:, 0], buffers

  _, _, _, buffers = jax.lax.while_loop(lambda c: c[0] < steps, body,
                                        (jnp.int32(0), cache, first, buffers))
  return dict(prompt_hidden=hidden, prompt_ids=prompt_ids, prompt_logp=prompt_logp,
              new_ids=buffers[0], new_hidden=buffers[1], new_top=buffers[2],
              new_logp=buffers[3])


@functools.partial(jax.jit, static_argnames=("config", "layers", "top_k"))
def _read(params, config: model_lib.ModelConfig, tokens, layers: tuple[int, ...], top_k: int):
  """The target reads tokens [B, S] (one forward, nothing generated): its hidden states and
  top-k next-token log-probabilities at every position."""
  logits, _, hidden = model_lib.forward_with_hidden(params, config, tokens, None, layers)
  ids, logp = _top_k(logits, top_k)
  return dict(hidden=hidden, ids=ids, logp=logp)


def top_k_by_chunks(x: jax.Array, k: int, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
  """The k largest entries of each row of x [B, V], largest first and the lower id first among
  equals: (ids [B, k] int32, values [B, k]), as k rounds of sampling.argmax would find them.

  Inside the collection's decode loop the logits come from a custom call (cpu_kernels' head),
  and XLA sorts the whole vocabulary for lax.top_k there; k rounds of a max over 32 x 49152
  logits took 10.6 ms of a ~100 ms step on the Intel Xeon. So: the best entry of each chunk of
  `chunk` ids (one pass), the k chunks whose best entries lead, and k rounds over those k * chunk
  candidates in id order. Exact: ranking entries by value, then lower id, an entry outside those
  chunks has k chunks' best entries, k distinct entries, ranked before it. (Rounds of argmax, not
  lax.top_k, pick among the few: XLA's CPU TopK does not keep the lower id first among equals.)"""
  b, v = x.shape
  chunks = -(-v // chunk)
  if chunks <= k:
    return _top_k_rounds(x, k)
  padded = jnp.pad(x, ((0, 0), (0, chunks * chunk - v)), constant_values=-jnp.inf)
  blocks = padded.reshape(b, chunks, chunk)
  best, _ = _top_k_rounds(jnp.max(blocks, axis=-1), k)                    # [B, k] chunk ids
  best = jnp.sort(best, axis=-1)                                          # id order
  candidates = jnp.take_along_axis(blocks, best[..., None], axis=1).reshape(b, k * chunk)
  ids = (best[..., None] * chunk + jnp.arange(chunk, dtype=best.dtype)).reshape(b, k * chunk)
  where, values = _top_k_rounds(candidates, k)
  return jnp.take_along_axis(ids, where, axis=1).astype(jnp.int32), values


def _top_k_rounds(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """k rounds of sampling.argmax over x [B, n], each masking its pick: (ids [B, k], values)."""
  ids, values = [], []
  for _ in range(k):
    ids.append(sampling.argmax(x))
    values.append(jnp.take_along_axis(x, ids[-1][:, None], axis=1)[:, 0])
    x = jnp.where(jnp.arange(x.shape[-1])[None] == ids[-1][:, None], -jnp.inf, x)
  return jnp.stack(ids, axis=1).astype(jnp.int32), jnp.stack(values, axis=1)


def _top_k(logits, top_k: int):  # [..., V] -> ids, log-probs [..., k], by XLA's TopK kernel
  # As a 2-D array of a fused operand: over [B, T, V] XLA's CPU backend sorted the whole
  # vocabulary instead (14 s for a batch's prompts).
  flat = logits.reshape(-1, logits.shape[-1])
  logp, ids = jax.lax.top_k(flat - jax.nn.logsumexp(flat, axis=-1, keepdims=True), top_k)
  shape = (*logits.shape[:-1], top_k)
  return ids.astype(jnp.int32).reshape(shape), logp.reshape(shape)


def collect_rows(params, config, prompts: list[list[int]], layers, settings: Settings) -> dict:
  """Runs the target on one batch of token prompts (at most seq_len tokens; shorter ones are
  continued greedily); returns numpy rows of seq_len positions: tokens [B, S], features
  [B, S, F], top_ids [B, S, k], top_logp [B, S, k], prompt_lens [B]."""
  # Two widths only (each one compilation): short prompts padded to prompt_tokens, or seq_len.
  s = settings.seq_len
  lens = np.asarray([len(p) for p in prompts], np.int32)
  if (lens == s).all():  # text to read: one forward, no decode loop to compile
    out = jax.tree.map(np.asarray, _read(params, config, jnp.asarray(prompts, jnp.int32),
                                         tuple(layers), settings.top_k))
    return dict(tokens=np.asarray(prompts, np.int32), features=out["hidden"],
                top_ids=out["ids"], top_logp=out["logp"], prompt_lens=lens)
  width = settings.prompt_tokens if max(map(len, prompts)) <= settings.prompt_tokens else s
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  out = jax.tree.map(np.asarray, _collect(params, config, jnp.asarray(tokens), jnp.asarray(lens),
                                          tuple(layers), s, settings.top_k))
  rows = {k: [] for k in ("tokens", "features", "top_ids", "top_logp")}
  for b, n in enumerate(lens):
    rows["tokens"].append(np.concatenate([tokens[b, :n], out["new_ids"][b, :s - n]]))
    rows["features"].append(np.concatenate([out["prompt_hidden"][b, :n],
                                            out["new_hidden"][b, :s - n]]))
    rows["top_ids"].append(np.concatenate([out["prompt_ids"][b, :n], out["new_top"][b, :s - n]]))
    rows["top_logp"].append(np.concatenate([out["prompt_logp"][b, :n],
                                            out["new_logp"][b, :s - n]]))
  return {k: np.stack(v) for k, v in rows.items()} | {"prompt_lens": lens}


def _encode_prompts(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
  encoded = []
  for text in texts:
    ids = tokenizer.encode(text)[:limit]
    if len(ids) >= 4:
      encoded.append(ids)
  return encoded


def _chunk_path(workdir: pathlib.Path, index: int) -> pathlib.Path:
  return workdir / DATA_DIR / f"chunk-{index:05d}.npz"


def _write_atomic_npz(path: pathlib.Path, arrays: dict) -> None:
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "wb") as f:
    np.savez(f, **arrays)
  os.replace(temporary, path)


class _Made:
  """The items of make(count) (a list that a larger count extends), made only as far as the
  chunks ask, doubling: a job stopped by its deadline after a few chunks never reads and parses
  the whole corpus first (8192 prompts cost ~27 s before the first chunk). `most` caps the count."""

  def __init__(self, make: Callable[[int], list], most: int):
    self.make, self.most, self.items, self.asked = make, most, [], 0

  def rows(self, start: int, n: int) -> list | None:
    while len(self.items) < start + n and self.asked < self.most:
      self.asked = min(self.most, max(2 * self.asked, 2 * (start + n)))
      self.items = self.make(self.asked)
    return self.items[start:start + n] if len(self.items) >= start + n else None


def collect(params, config, tokenizer, workdir: pathlib.Path, layers, settings: Settings,
            max_chunks: int, deadline: float | None, log: Callable = print) -> int:
  """Fills DIR/data with chunks 0, 1, ... (each `collect_batch` rows), skipping those already
  there, until max_chunks or the deadline. Returns the number of chunks on disk."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  from amd135m.data import prompts as prompts_lib  # noqa: PLC0415 (reads the corpora)
  (workdir / DATA_DIR).mkdir(exist_ok=True)
  every, rows = settings.generate_every, settings.collect_batch
  n_generated = -(-max_chunks // every) if every else 0
  n_corpus = (max_chunks - n_generated) * rows
  prompts = _Made(lambda n: _encode_prompts(
      tokenizer, prompts_lib.mixed_prompts(n, settings.seed, settings.code_every),
      settings.prompt_tokens), most=n_generated * rows * 2)

  def read_windows(n: int) -> list[list[int]]:  # long texts, cut to exactly seq_len tokens
    # n texts in the interleaved pattern, neither list running out: a larger n extends them.
    code = prompts_lib.stdlib_functions(n, settings.seed)
    prose = prompts_lib.gutenberg_passages(n // settings.code_every + 1, settings.seed,
                                           words=(600, 800))
    texts = prompts_lib.interleave(code, prose, settings.code_every)[:n]
    return [w for w in _encode_prompts(tokenizer, texts, settings.seq_len)
            if len(w) == settings.seq_len]
  windows = _Made(read_windows, most=n_corpus * 2)

  def batch_of(index: int) -> list[list[int]] | None:
    if every and index % every == 0:
      return prompts.rows(index // every * rows, rows)
    return windows.rows((index - (index // every + 1 if every else 0)) * rows, rows)

  done = sum(1 for i in range(max_chunks) if _chunk_path(workdir, i).exists())
  bar = tqdm(total=max_chunks, initial=done, desc="collect", unit="chunk", file=sys.stderr,
             dynamic_ncols=True)
  started, made = time.time(), 0
  try:
    for index in range(max_chunks):
      path = _chunk_path(workdir, index)
      if path.exists():
        continue
      if deadline is not None and time.time() > deadline:
        break
      batch = batch_of(index)
      if batch is None:  # a corpus ran out
        break
      _write_atomic_npz(path, collect_rows(params, config, batch, layers, settings))
      made += 1
      if deadline is not None:  # the chunks the deadline leaves room for, so the ETA holds
        pace = (time.time() - started) / made
        bar.total = min(max_chunks, bar.n + 1 + math.ceil(max(0.0, deadline - time.time()) / pace))
      bar.update(1)
  finally:
    bar.close()
  return sum(1 for i in range(max_chunks) if _chunk_path(workdir, i).exists())


def load_data(workdir: pathlib.Path) -> dict:
  """Every collected chunk, rows concatenated (chunks in index order, stopping at a gap)."""
  parts, index = [], 0
  while _chunk_path(workdir, index).exists():
    with np.load(_chunk_path(workdir, index)) as chunk:
      parts.append({k: chunk[k] for k in chunk.files})
    index += 1
  if not parts:
    raise UserError(f"{workdir / DATA_DIR} holds no collected data: give the job more time "
                    "(--minutes) or rerun with --resume")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# 2. Vocabulary.

def choose_vocab(data: dict, vocab_size: int, target_vocab: int) -> np.ndarray:
  """The K ids the target most often predicts first (weighted double) or reads in the collected
  rows, most frequent first; ties and never-seen ids by id."""
  counts = np.zeros(target_vocab, np.int64)
  np.add.at(counts, data["tokens"].reshape(-1), 1)
  np.add.at(counts, data["top_ids"][..., 0].reshape(-1), 2)
  order = np.lexsort((np.arange(target_vocab), -counts))
  return order[:vocab_size].astype(np.int32)


def coverage(data: dict, vocab: np.ndarray) -> float:
  """Share of positions whose target's first choice is among the K ids (a bound on greedy
  acceptance)."""
  inside = np.zeros(int(data["top_ids"].max()) + 1, bool)
  inside[vocab[vocab < inside.size]] = True
  return float(inside[data["top_ids"][..., 0]].mean())


# ---------------------------------------------------------------------------------------------
# 3. Training.

def _lr(settings: Settings, step: int, total_steps: int) -> float:
  """Linear warmup, then cosine to a tenth."""
  if step < settings.warmup_steps:
    return settings.lr * (step + 1) / settings.warmup_steps
  progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
  return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(settings: Settings) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(settings.clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=settings.lr, b1=0.9, b2=0.95,
                                            weight_decay=settings.weight_decay))


def head_loss(params, head_config: feature_draft.HeadConfig, settings: Settings, batch: dict,
              embedding, to_draft) -> tuple[jax.Array, dict]:
  """Cross-entropy of the draft's distribution over its K ids against the target's (its top-k,
  renormalised over nothing: mass off the K ids is simply not rewarded), per unroll step,
  weighted 0.8^step as EAGLE-3; plus, with feature_weight, EAGLE's smooth-L1 regression of the
  draft's h at i onto the target's features at i + 1 (meaningful with layers=last).

  batch: tokens [B, S], features [B, S, F], top_ids / top_logp [B, S, k]. Position i reads
  features[i] and tokens[i + 1]; its target is the distribution at i + 1 (of token i + 2)."""
  features = batch["features"][:, :-1]
  next_embeddings = jnp.take(embedding, batch["tokens"][:, 1:], axis=0).astype(jnp.float32)
  logits, hs = feature_draft.unrolled_logits(params, head_config, features, next_embeddings,
                                             settings.unroll)
  top_ids, top_logp = batch["top_ids"][:, 1:], batch["top_logp"][:, 1:]           # [B, T, k]
  index = to_draft[top_ids]                                                         # -1: off K
  p = jnp.where(index >= 0, jnp.exp(top_logp), 0.0)
  t = features.shape[1]
  metrics, total, weights = {}, 0.0, 0.0
  for step, step_logits in enumerate(logits):
    valid = (jnp.arange(t) >= step)[None, :]                                        # [1, T]
    logq = jax.nn.log_softmax(step_logits, axis=-1)
    ce = -jnp.sum(p * jnp.take_along_axis(logq, jnp.maximum(index, 0), axis=-1), axis=-1)
    count = valid.sum() * ce.shape[0]
    ce = jnp.sum(jnp.where(valid, ce, 0.0)) / count
    # The head agrees where the target's first choice has its largest logit: a max and a
    # gather, where XLA's argmax over the K ids took ~4% of a step (ties aside, the same).
    first = index[..., 0]
    chosen = jnp.take_along_axis(step_logits, jnp.maximum(first, 0)[..., None], axis=-1)[..., 0]
    agree = (chosen >= jnp.max(step_logits, axis=-1)) & (first >= 0)
    metrics[f"agreement_{step}"] = jnp.sum(jnp.where(valid, agree, False)) / count
    metrics[f"ce_{step}"] = ce
    weight = 0.8 ** step
    total, weights = total + weight * ce, weights + weight
  loss = total / weights
  if settings.feature_weight:
    target = batch["features"][:, 1:, -head_config.target.dim:]
    regression = jnp.mean(optax.huber_loss(hs[0], target))
    metrics["feature_loss"] = regression
    loss = loss + settings.feature_weight * regression
  metrics["loss"] = loss
  return loss, metrics


def make_step(head_config, settings: Settings, optimizer):
  @jax.jit
  def step(state, batch, lr, embedding, to_draft):
    def loss_fn(params):
      return head_loss(params, head_config, settings, batch, embedding, to_draft)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    opt_state = state["opt_state"]
    opt_state[1].hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  @jax.jit
  def evaluate(params, batch, embedding, to_draft):
    return head_loss(params, head_config, settings, batch, embedding, to_draft)[1]

  return step, evaluate


def _batch_rows(step: int, n_rows: int, batch: int, seed: int) -> np.ndarray:
  """The rows of training step `step` (0-based): epochs are seeded permutations, so a resumed
  run draws exactly the batches an uninterrupted one would."""
  rows = []
  position = step * batch
  while len(rows) < batch:
    epoch, offset = divmod(position, n_rows)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    take = min(batch - len(rows), n_rows - offset)
    rows.extend(order[offset:offset + take])
    position += take
  return np.asarray(rows)


def expected_tokens(agreements: list[float]) -> float:
  """Tokens a round yields if draft step j is accepted with the j-th agreement (conditional on
  the earlier ones): 1 + a0 + a0 a1 + ..., the training's estimate of tokens per target call."""
  total, run = 1.0, 1.0
  for a in agreements:
    run *= a
    total += run
  return total


@dataclasses.dataclass
class Hooks:
  """Test seams: kill -9 right after a step (or during its save), by step number, not timing;
  a machine that turns busy (each step from step `slow_from` on takes `slow_seconds` longer)."""
  kill_after_step: int = -1
  kill_during_save: int = -1
  slow_from: int = -1
  slow_seconds: float = 0.0


def train_head(target: str, workdir, *, minutes: float | None = None, steps: int | None = None,
               prompts: int | None = None, settings: Settings = Settings(), resume: bool = False,
               checkpoint_every: int = 50, eval_every: int = 50, progress: bool = True,
               hooks: Hooks | None = None, log: Callable = print) -> dict:
  """Collects, chooses the vocabulary and trains into `workdir`; returns a summary dict.

  minutes: wall-time bound of this call (collection + training). steps: train exactly this many
  steps (collect `prompts` rows, default 256). One of the two is required."""
  start_time = time.time()
  hooks = hooks or Hooks()
  if (minutes is None) == (steps is None):
    raise UserError("give one of --minutes M (a wall-time budget) or --steps N")
  if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
    raise UserError(f"--minutes must be a number > 0, got {minutes}")
  if steps is not None and steps < 1:
    raise UserError(f"--steps must be >= 1, got {steps}")
  if prompts is not None and prompts < 1:
    raise UserError(f"--prompts must be >= 1, got {prompts}")
  target_path = pathlib.Path(target).expanduser()
  if not target_path.exists():
    raise UserError(f"--target {target}: no such file or directory (a GGUF, a Hugging Face "
                    "directory or a training workdir)")
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if head_io.is_head_workdir(workdir) and not resume:
    raise UserError(f"--workdir {workdir} already holds a head: add --resume to continue it, "
                    "or choose a new --workdir")
  if workdir.exists() and any(workdir.iterdir()) and not head_io.is_head_workdir(workdir):
    raise UserError(f"--workdir {workdir} is not empty and holds no head: choose a new or empty "
                    "directory")
  make_dir(workdir, "--workdir")
  if not os.access(workdir, os.W_OK):
    raise UserError(f"--workdir {workdir} is not writable: choose a writable directory")

  from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415
  config, target_params = checkpoints.load_params(target_path)
  target_params = jax.tree.map(jnp.asarray, target_params)
  tokenizer = load_tokenizer(target_path)
  # "auto" is decided once, where the head starts: a resumed run computes as it began.
  settings = _settled(workdir, dataclasses.replace(settings, compute=settings.compute_dtype()))
  settings.check(config.vocab_size)
  layers = resolve_layers(settings.layers, config.n_layers)
  print_ = head_io.fingerprint(config, target_params)
  if head_io.is_head_workdir(workdir):
    record = head_io.read_record(workdir)
    if record.target_fingerprint != print_:
      raise UserError(f"--workdir {workdir} holds a head for another target "
                      f"({record.target_path}): resume it with that target, or use a new workdir")
  else:
    record = head_io.HeadRecord(target=head_io.architecture(config), target_fingerprint=print_,
                                target_path=str(target_path), feature_layers=layers,
                                draft_vocab=settings.vocab)
    head_io.write_record(workdir, record)
  deadline = start_time + 60 * minutes if minutes is not None else None

  # 1. Collection.
  collect_start = time.time()
  rows_wanted = prompts or (256 if steps is not None else 4096)
  max_chunks = max(1, -(-rows_wanted // settings.collect_batch))
  collect_deadline = (start_time + 60 * minutes * settings.collect_share
                      if minutes is not None else None)
  if (workdir / head_io.VOCAB_FILE).exists():
    # Training began on these rows (the vocabulary was chosen from them): a resumed run trains
    # on, it does not collect for another share of its budget and change the data under way.
    chunks = len(list((workdir / DATA_DIR).glob("chunk-*.npz")))
  else:
    # The target in its decode layout (f32 panels, the kernel's sums): 32 rows continued, or
    # read as text, 1.14-1.25x faster on a 2-core Zen 4 than XLA's GEMM (docs/RESULTS.md).
    chunks = collect(quantize.decode_layout(target_params, config), config, tokenizer, workdir,
                     layers, settings, max_chunks, collect_deadline, log)
  collect_seconds = time.time() - collect_start
  data = load_data(workdir)
  n_rows = data["tokens"].shape[0]
  if n_rows < 2:
    raise UserError(f"only {n_rows} row was collected in the time given: give the job more "
                    "--minutes (or more --prompts)")
  if n_rows <= settings.eval_rows:  # a short budget: hold out a quarter instead
    log(f"[collect] only {n_rows} rows: holding out {max(1, n_rows // 4)} instead of "
        f"{settings.eval_rows}")
    settings = dataclasses.replace(settings, eval_rows=max(1, n_rows // 4))

  # 2. Vocabulary (fixed once chosen: a resumed run keeps it).
  vocab_path = workdir / head_io.VOCAB_FILE
  train_data = {k: v[settings.eval_rows:] for k, v in data.items()}
  eval_data = {k: v[:settings.eval_rows] for k, v in data.items()}
  if not vocab_path.exists():
    vocab = choose_vocab(train_data, settings.vocab, config.vocab_size)
    temporary = vocab_path.with_name(".vocab.tmp.npy")
    np.save(temporary, vocab)
    os.replace(temporary, vocab_path)
  vocab = head_io.read_vocab(workdir)
  log(f"[vocab] K = {len(vocab)}: the target's first choice is among them at "
      f"{coverage(train_data, vocab):.1%} of training positions, {coverage(eval_data, vocab):.1%}"
      " held out")

  # 3. Training.
  head_config = feature_draft.HeadConfig(config, layers, settings.vocab,
                                         dtype=settings.compute_dtype())
  optimizer = make_optimizer(settings)
  train_step, evaluate = make_step(head_config, settings, optimizer)
  embedding = target_params["embed_tokens"]["embedding"]
  to_draft = np.full(config.vocab_size, -1, np.int32)
  to_draft[vocab] = np.arange(len(vocab), dtype=np.int32)
  to_draft = jnp.asarray(to_draft)
  ckpt = orbax_io.TrainCheckpoints(workdir, keep=2, async_save=False)
  try:
    latest = ckpt.latest_step()
    init = lambda: _init_state(head_config, target_params, vocab, optimizer, settings.seed)
    if latest is not None:
      abstract = jax.eval_shape(init)
      state, _, _ = ckpt.restore(latest, abstract)
    else:
      state = init()
    start_step = int(state["step"])
    schedule = _read_json(workdir / SCHEDULE_FILE)
    total_steps = schedule.get("total_steps") if schedule else steps
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    eval_batch = {k: jnp.asarray(v) for k, v in eval_data.items() if k != "prompt_lens"}
    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    bar = metrics_lib.progress_bar(total_steps or 0, start_step, enabled=progress)

    def held_out() -> dict:  # the eval_* fields of a record
      evaluated = {k: float(v) for k, v in jax.device_get(
          evaluate(state["params"], eval_batch, embedding, to_draft)).items()}
      return {**{f"eval_{k}": v for k, v in evaluated.items()},
              "eval_expected_tokens_per_call": expected_tokens(
                  [evaluated[f"agreement_{j}"] for j in range(settings.unroll)])}

    step = start_step
    timing, last = [], {}
    train_start = time.time()
    pace_from = None    # (time, step) after this call's first (compiling) step
    final_seconds = 0.0  # the last evaluation and checkpoint, as last measured
    try:
      while total_steps is None or step < total_steps:
        if deadline is not None and time.time() > deadline - 5:
          log(f"[train] out of time at step {step}: saved; rerun with --resume to continue")
          break
        rows = _batch_rows(step, train_data["tokens"].shape[0], settings.batch, settings.seed)
        batch = {k: jnp.asarray(v[rows]) for k, v in train_data.items() if k != "prompt_lens"}
        lr = _lr(settings, step, total_steps or 10 ** 9)
        tick = time.perf_counter()
        state, metrics = train_step(state, batch, jnp.float32(lr), embedding, to_draft)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if 0 <= hooks.slow_from <= step:
          time.sleep(hooks.slow_seconds)
        timing.append(time.perf_counter() - tick)
        step += 1
        if pace_from is None:
          pace_from = (time.time(), step)
        if not math.isfinite(metrics["loss"]):
          raise UserError(f"the head's loss is {metrics['loss']} at step {step}: lower --lr and "
                          "rerun with --resume (the last good checkpoint is kept)")
        if total_steps is None and len(timing) == 3:
          # The schedule's length, fixed once: as many steps as fit before the deadline, with
          # the held-out evaluations and checkpoints on the way and at the end counted in (the
          # evaluation compiled and timed now, a checkpoint saved and timed now). Counting steps
          # alone left a 4-minute head one step short of its schedule on a Zen 4.
          per_step = float(np.median(timing[1:]))  # the first step compiled
          jax.block_until_ready(evaluate(state["params"], eval_batch, embedding, to_draft))
          tick = time.perf_counter()
          jax.block_until_ready(evaluate(state["params"], eval_batch, embedding, to_draft))
          eval_seconds = time.perf_counter() - tick
          tick = time.perf_counter()
          _save(ckpt, step, state, settings, hooks)
          save_seconds = time.perf_counter() - tick
          final_seconds = eval_seconds + save_seconds
          left = deadline - 10 - time.time() - eval_seconds - save_seconds  # the last step's
          per_step_all = (per_step + eval_seconds / eval_every
                          + save_seconds / checkpoint_every)
          # 3% to spare: a 25-minute schedule sized on two timed steps ran 8 of its 712 steps
          # past the deadline on a quiet Zen 4. (Timing a third step made the tests' 24-second
          # budget run out before the schedule was fixed, on a loaded machine.)
          total_steps = step + max(1, int(0.97 * left / per_step_all))
          _write_json(workdir / SCHEDULE_FILE, {"total_steps": total_steps,
                                                "seconds_per_step": per_step})
          bar.reset(total=total_steps)
          bar.update(step)
        agreements = [metrics[f"agreement_{j}"] for j in range(settings.unroll)]
        record = {"train_loss": metrics["loss"], "lr": lr, "grad_norm": metrics["grad_norm"],
                  **{k: v for k, v in metrics.items() if k.startswith(("agreement", "ce_"))},
                  "expected_tokens_per_call": expected_tokens(agreements),
                  "step_seconds": timing[-1]}
        tick = time.perf_counter()
        if step % eval_every == 0 or step == total_steps:
          record.update(held_out())
        writer.write(step, record)
        last = record
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", agree=f"{agreements[0]:.2f}")
        bar.update(1)
        if step % checkpoint_every == 0 or step == total_steps or preempted:
          _save(ckpt, step, state, settings, hooks)
        if step % eval_every == 0 and step % checkpoint_every == 0:
          final_seconds = time.perf_counter() - tick
        if (deadline is not None and total_steps is not None and step % eval_every == 0
            and pace_from[1] + 2 <= step < total_steps):
          # Re-sized at each evaluation on the pace measured since this call's first step
          # (evaluations and checkpoints included): the steps timed at the start can be faster
          # than the rest (a 45-minute head sized on them stopped 37 steps short of its 1190 at
          # the deadline, incomplete), and a resumed run fits what is left of its own budget.
          pace = (time.time() - pace_from[0]) / (step - pace_from[1])
          left = deadline - 10 - time.time() - final_seconds
          resized = step + max(1, int(0.98 * left / pace))
          if resized != total_steps:
            total_steps = resized
            _write_json(workdir / SCHEDULE_FILE, {"total_steps": total_steps,
                                                  "seconds_per_step": pace})
            bar.reset(total=total_steps)
            bar.update(step)
        if hooks.kill_after_step == step:
          os.kill(os.getpid(), signal.SIGKILL)
        if preempted:
          log(f"[train] SIGTERM: saved step {step}, exiting; rerun with --resume")
          break
      if ckpt.latest_step() != step and step > start_step:
        _save(ckpt, step, state, settings, hooks)
      if "eval_agreement_0" not in last:
        # Stopped between evaluations (the deadline, SIGTERM) or resumed with nothing left to
        # do: the summary still reports the head as it stands (it printed "nan" before).
        last = {**last, **held_out()}
      finished = total_steps is not None and step >= total_steps
      if finished:
        (workdir / COMPLETE).write_text(f"{step}\n")
    finally:
      signal.signal(signal.SIGTERM, previous_handler)
      bar.close()
      writer.close()
  finally:
    ckpt.close()
  summary = {"workdir": str(workdir), "target": str(target_path), "feature_layers": list(layers),
             "vocab": len(vocab), "rows": n_rows, "chunks": chunks, "step": step,
             "total_steps": total_steps, "complete": (workdir / COMPLETE).exists(),
             "collect_seconds": round(collect_seconds, 1),
             "train_seconds": round(time.time() - train_start, 1),
             "seconds": round(time.time() - start_time, 1),
             "coverage": coverage(eval_data, vocab), "last": last}
  _write_json(workdir / "summary.json", summary)
  return summary


def _init_state(head_config, target_params, vocab, optimizer, seed: int) -> dict:
  params = jax.tree.map(jnp.asarray, feature_draft.init_params(
      head_config, target_params, vocab, jax.random.key(seed)))
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}


def _save(ckpt, step: int, state, settings: Settings, hooks: Hooks) -> None:
  if hooks.kill_during_save == step:
    os.kill(os.getpid(), signal.SIGKILL)
  ckpt.save(step, state, {"step": step}, {"settings": dataclasses.asdict(settings)})
  ckpt.wait()


def _settled(workdir: pathlib.Path, settings: Settings) -> Settings:
  """The workdir's settings if it has them (a resumed run keeps its own), else these, written."""
  saved = _read_json(workdir / SETTINGS_FILE)
  if saved:
    return Settings(**{"compute": "float32", **saved})  # heads from before --compute: f32
  _write_json(workdir / SETTINGS_FILE, dataclasses.asdict(settings))
  return settings


def _read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except ValueError as e:
    raise UserError(f"{path} is damaged ({e}): delete it and rerun with --resume") from None


def _write_json(path: pathlib.Path, value: dict) -> None:
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(json.dumps(value, indent=1) + "\n")
  os.replace(temporary, path)
