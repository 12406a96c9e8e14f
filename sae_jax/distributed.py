"""Multi-host plumbing: one process per host, one global mesh, each host feeding its own rows.

On a TPU pod or several GPU nodes every host runs the same entry point; ``initialize`` joins
them (``jax.distributed``), after which ``jax.devices()`` lists every chip of every host and
``sharding.make_mesh()`` builds one global mesh. Batches are assembled from each host's share
with ``jax.make_array_from_process_local_data``; only process 0 writes run files (Orbax
checkpoints are written by every host, as Orbax requires). On a CPU host the collectives go
through gloo, which is how the tests run several local processes.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sae_jax.errors import ConfigError

ENV_COORDINATOR, ENV_NUM, ENV_ID = ("SAE_JAX_COORDINATOR", "SAE_JAX_NUM_PROCESSES",
                                    "SAE_JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Join a multi-process run; returns whether one was joined (False: single process).

  Arguments default to the ``SAE_JAX_COORDINATOR`` / ``SAE_JAX_NUM_PROCESSES`` /
  ``SAE_JAX_PROCESS_ID`` environment (what ``launch/local_multiprocess.sh`` and ``gpu.sh`` set).
  With ``coordinator="auto"`` JAX discovers the cluster itself (Cloud TPU VMs, SLURM).
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
  if not coordinator:
    return False
  if jax.distributed.is_initialized():  # already joined (e.g. a notebook cell run twice)
    return True
  num = num_processes if num_processes is not None else os.environ.get(ENV_NUM)
  pid = process_id if process_id is not None else os.environ.get(ENV_ID)
  if coordinator == "auto":
    jax.distributed.initialize()
  else:
    if num is None or pid is None:
      raise ConfigError(f"coordinator={coordinator!r} needs the number of processes and this "
                        f"process's id ({ENV_NUM}, {ENV_ID})")
    num, pid = int(num), int(pid)
    if not 0 <= pid < num:
      raise ConfigError(f"process id {pid} is outside 0..{num - 1}")
    if _cpu_only():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
  logging.info("process %d of %d; %d local of %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _cpu_only() -> bool:
  """Whether this process will run on CPU, decided without starting a backend (which must
  happen only after ``jax.distributed.initialize``)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] == "cpu"
  import importlib.util
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
             "libtpu")
  return not any(importlib.util.find_spec(m) is not None for m in plugins)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def to_global(local: np.ndarray, sharding) -> jax.Array:
  """A global [P * n, ...] array from every process's [n, ...] rows (process order); a
  jax.Array is global already (it is only placed on ``sharding``)."""
  if jax.process_count() == 1 or isinstance(local, jax.Array):
    return jax.device_put(local, sharding)
  shape = (local.shape[0] * jax.process_count(),) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local, shape)


def gather_rows(local):
  """Every process's rows concatenated in process order, on every host (numpy; dict-aware)."""
  if jax.process_count() == 1 or isinstance(local, jax.Array):
    return local  # a jax.Array is global already
  if isinstance(local, dict):
    return {k: gather_rows(v) for k, v in local.items()}
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def to_host(tree):
  """Numpy copies of a pytree of (possibly multi-host sharded) arrays, on every host."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))  # explicit: allowed under jax.transfer_guard
  return jax.tree.map(get, tree)


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def all_processes(flag: bool) -> bool:
  """Whether ``flag`` is set on every process (a collective: every process must call it)."""
  return not any_process(not flag)


def barrier(name: str) -> None:
  """Wait until every process reaches ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
