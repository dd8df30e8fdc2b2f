"""Meshes and the rule table that maps the model's logical axis names onto them.

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data
parallelism with parameters and optimizer state sharded, gathered per layer by XLA) and `tensor`
(heads and the MLP's hidden units split across devices). Batches split over (data, fsdp).
"""
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis -> mesh axes (None: replicated). Read top to bottom; nothing matches implicitly.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
}


def activation_rules(rules: Mapping) -> dict:
  """model.logical_sharding's rules for the model's activations and weights in use: rows over
  (data, fsdp), heads / MLP / vocab as their parameters, the residual stream's embed dim whole
  (FSDP gathers the weights, not the activations)."""
  activations = (("act_batch", BATCH), ("act_seq", None), ("act_embed", None),
                 ("act_heads", rules.get("heads")), ("act_kv_heads", rules.get("kv_heads")),
                 ("act_mlp", rules.get("mlp")), ("act_vocab", rules.get("vocab")))
  # Weights in use: as stored, less the FSDP axis (gathered for the computation).
  weights = tuple((f"use_{name}", _without_fsdp(target)) for name, target in rules.items())
  return dict(activations + weights)


def _without_fsdp(target):
  names = (target,) if isinstance(target, str) else tuple(target or ())
  kept = tuple(n for n in names if n != "fsdp")
  return None if not kept else kept[0] if len(kept) == 1 else kept


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 (all devices left over)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise UserError(f"unknown mesh axes {unknown}: the mesh has axes {list(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, one may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                    f"{len(devices)} are visible: make the sizes multiply to {len(devices)}")
  # mesh_utils orders devices so that inner axes sit on the fastest links (within a host).
  from jax.experimental import mesh_utils
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def parse_rules(overrides: str = "") -> dict:
  """DEFAULT_RULES with 'logical=mesh_axis|replicate,...' overrides (e.g. 'kv_heads=replicate')."""
  rules = dict(DEFAULT_RULES)
  for item in filter(None, overrides.replace(" ", "").split(",")):
    logical, _, target = item.partition("=")
    if logical not in rules or not target:
      raise UserError(f"sharding rule {item!r}: write LOGICAL=AXIS or LOGICAL=replicate with "
                      f"LOGICAL one of {sorted(rules)}")
    if target == "replicate":
      rules[logical] = None
    else:
      axes = tuple(target.split("+"))
      if any(a not in MESH_AXES for a in axes):
        raise UserError(f"sharding rule {item!r}: mesh axes are {list(MESH_AXES)}")
      rules[logical] = axes if len(axes) > 1 else axes[0]
  return rules


def _axis_size(mesh: Mesh, target) -> int:
  names = (target,) if isinstance(target, str) else tuple(target or ())
  return int(np.prod([mesh.shape[name] for name in names]))


def param_specs(logical: dict, mesh: Mesh, rules: Mapping, config: ModelConfig) -> dict:
  """PartitionSpecs for parameters whose logical axes are `logical` (model.logical_axes).

  A split must divide evenly, counted in whole heads for `heads` and `kv_heads` (splitting a head
  across devices would be legal for XLA but slow and surprising): otherwise a UserError names the
  rule to change, e.g. SmolLM2's 3 KV heads on tensor=2 need 'kv_heads=replicate'."""
  units = {"heads": config.n_heads, "kv_heads": config.n_kv_heads}

  def spec(path, logical_spec, shape):
    mesh_axes = []
    for name, size in zip(logical_spec, shape):
      target = rules.get(name) if name is not None else None
      ways = _axis_size(mesh, target)
      count = units.get(name, size)
      if ways > 1 and count % ways:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise UserError(
            f"{where}: {name} ({count}) does not divide over mesh axis {target} ({ways} ways); "
            f"change the mesh or set --config.sharding_rules='{name}=replicate'")
      mesh_axes.append(target if ways > 1 else None)
    return P(*mesh_axes)

  shapes = _shapes(config)
  return jax.tree_util.tree_map_with_path(
      lambda path, s, shape: spec(path, s, shape), logical, shapes,
      is_leaf=lambda x: isinstance(x, P))


def _shapes(config: ModelConfig) -> dict:
  from amd135m import model as model_lib
  abstract = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  return jax.tree.map(lambda a: tuple(a.shape), abstract)


def named(mesh: Mesh, specs):
  """NamedShardings for a pytree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: rows split over (data, fsdp), sequence whole."""
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
