"""Device meshes and the one logical-axis rules table.

Model and SAE code name *logical* axes ("batch", "embed", "latent", ...); this module alone maps
them to the mesh axes ("data", "model"). Change the table, not the model code, to reshard.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sae_jax.config import MeshConfig
from sae_jax.errors import ConfigError

# logical axis -> mesh axis (None: replicated). "embed" may be mapped to "fsdp" on a mesh that
# has such an axis; every other entry is fixed by DESIGN.md.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "latent": "model",
    "embed": None,
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "head_dim": None,
    "length": None,
}


class Axes(tuple):
  """Logical axis names of one array, marked so pytrees of them are unambiguous.

  (Optimizer states are NamedTuples; a plain tuple of names would be mistaken for one.)
  """


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over ``devices`` (default: every device of every process), or
  over the first ``cfg.devices`` of them."""
  cfg = cfg or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  if cfg.devices:
    if cfg.devices > len(devices) or jax.process_count() > 1:
      raise ConfigError(f"mesh devices={cfg.devices}: {len(devices)} device(s) in "
                        f"{jax.process_count()} process(es); a subset of the devices is for one "
                        "process with at least that many")
    devices = devices[:cfg.devices]
  n = len(devices)
  data, model = cfg.data, cfg.model
  if data * model > n:  # both set (-1 makes the product negative)
    raise ConfigError(f"mesh data={data} x model={model} asks for {data * model} devices; "
                      f"{n} exist")
  if data == -1:
    data = n // model if n % model == 0 else -1
  if model == -1:
    model = n // data if n % data == 0 else -1
  if data < 1 or model < 1 or data * model != n:
    raise ConfigError(f"mesh data={cfg.data} x model={cfg.model} does not tile the {n} available "
                      f"devices; choose sizes whose product is {n}")
  grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, MeshConfig.AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def spans_processes(mesh: Mesh | None) -> bool:
  """Whether ``mesh`` holds devices of another process (its programs are collective)."""
  return mesh is not None and any(d.process_index != jax.process_index()
                                  for d in mesh.devices.flat)


def local_mesh(mesh: Mesh) -> Mesh:
  """This process's share of ``mesh``: a ("data", "model") mesh over its own devices with the
  same "model" size (each host then runs the model whole on its own chips, with no collective
  across hosts). One-line ConfigError when "model" does not divide the host's devices."""
  mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  model = mesh.shape["model"]
  if len(mine) % model:
    raise ConfigError(f"mesh model={model} does not divide this host's {len(mine)} devices: "
                      f"a per-host model copy (cache mode on several hosts) needs a 'model' "
                      f"axis that divides {len(mine)}")
  return make_mesh(MeshConfig(data=len(mine) // model, model=model), mine)


def logical_to_spec(axes: Sequence[str | None], rules: dict[str, str | None] | None = None) -> P:
  """PartitionSpec for an array whose dimensions carry the logical names ``axes``."""
  rules = LOGICAL_RULES if rules is None else rules
  out = []
  for a in axes:
    if a is not None and a not in rules:
      raise ConfigError(f"logical axis {a!r} has no rule; known: {sorted(rules)}")
    out.append(None if a is None else rules[a])
  return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding on ``mesh`` for logical ``axes``; axes missing from the mesh are replicated."""
  spec = logical_to_spec(axes)
  spec = P(*(s if s in mesh.axis_names else None for s in spec))
  return NamedSharding(mesh, spec)


def sharding_for_shape(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]
                       ) -> NamedSharding:
  """Like named_sharding, but a dimension that does not split evenly is replicated instead
  (e.g. a vocabulary of 50277 rows on a 2-way "model" axis)."""
  spec = named_sharding(mesh, axes).spec
  fitted = [a if a is None or size % mesh.shape[a] == 0 else None
            for a, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)]
  return NamedSharding(mesh, P(*fitted))


def place(host: np.ndarray, mesh: Mesh | None, axes: Sequence[str | None] = ()) -> jax.Array:
  """A host array every process holds whole -> on the default device (no mesh), or a global
  array on ``mesh`` split by logical ``axes`` (none: replicated), each device copying only its
  own slice (no device ever holds the whole of a sharded array, no process needs another's)."""
  if mesh is None:
    return jax.device_put(host)
  sh = sharding_for_shape(mesh, axes, host.shape)
  return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])


def tree_shardings(axes_tree, mesh: Mesh):
  """Map a pytree whose leaves are :class:`Axes` to NamedShardings on ``mesh``."""
  return jax.tree.map(lambda a: named_sharding(mesh, a), axes_tree,
                      is_leaf=lambda a: isinstance(a, Axes))


def check_divisible(size: int, mesh: Mesh, axis: str, what: str) -> None:
  """Raise a ConfigError unless ``size`` splits evenly over mesh axis ``axis``."""
  n = mesh.shape[axis]
  if size % n:
    raise ConfigError(f"{what}={size} is not divisible by the mesh '{axis}' axis size {n}")


def check_logical_divisible(mesh: Mesh, sizes: dict[str, int], what: str) -> None:
  """One-line ConfigError unless each logical dimension in ``sizes`` (name -> size) splits
  evenly over the mesh axis the rules map it to (unmapped axes and axes of size 1 split
  nothing), naming the sizes and the axis sizes that would work."""
  by_axis: dict[str, list[tuple[str, int]]] = {}
  for name, size in sizes.items():
    axis = named_sharding(mesh, (name,)).spec[0]
    if axis is not None and mesh.shape[axis] > 1:
      by_axis.setdefault(axis, []).append((name, size))
  for axis, dims in by_axis.items():
    n = mesh.shape[axis]
    bad = [f"{name}={size}" for name, size in dims if size % n]
    if bad:
      g = math.gcd(*(size for _, size in dims))
      allowed = [d for d in range(1, g + 1) if g % d == 0]
      raise ConfigError(f"{what}: the mesh's '{axis}' axis of size {n} does not divide "
                        f"{', '.join(bad)} (tensor parallelism splits "
                        f"{', '.join(f'{k}={v}' for k, v in dims)}); allowed '{axis}' sizes: "
                        f"{', '.join(map(str, allowed))}")


def settle(x, mesh: Mesh):
  """Wait for ``x`` on a multi-device CPU mesh (XLA:CPU runs independent programs side by side,
  and two programs with collectives in flight at once can deadlock its rendezvous); elsewhere
  a no-op, so accelerators keep dispatching ahead. The data path and the train step both call
  it between their programs."""
  if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu":
    jax.block_until_ready(x)
  return x
