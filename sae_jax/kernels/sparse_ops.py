"""The sparse row operations of the TopK step as Pallas kernels (``kernels="pallas"``).

``kernels="xla"`` (the default) keeps the scan-over-K gathers and scatter-adds of
:mod:`sae_jax.kernels.topk`. ``kernels="pallas"`` calls these functions, which pick the kernels
of the platform being compiled for when the program is lowered (``lax.platform_dependent``):
Triton on GPU (:mod:`pallas_gpu`), Mosaic on TPU (:mod:`pallas_tpu`), and on any other platform
the GPU kernels in interpret mode (slow; it exists so the CPU tests can check them).

Every function takes local rows already clamped into the shard's table, with the weights of rows
the shard does not own set to zero (``owned_rows`` in topk.py gives both).
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from sae_jax.config import KERNELS
from sae_jax.errors import ConfigError
from sae_jax.kernels import pallas_gpu, pallas_tpu


def check_kernels(kernels: str) -> None:
  """One-line error for a ``kernels`` name the kernels cannot run (``auto`` is resolved by the
  train step, :func:`resolve_kernels`)."""
  allowed = [k for k in KERNELS if k != "auto"]
  if kernels not in allowed:
    raise ConfigError(f"kernels={kernels!r}; allowed here: {allowed} (resolve 'auto' first)")


def resolve_kernels(kernels: str, platform: str) -> str:
  """TrainConfig.kernels for a mesh of ``platform`` devices: ``auto`` is ``pallas`` on a GPU
  (faster on an H200 at both benchmark shapes, benchmarks/gpu_h200/) and ``xla`` elsewhere (the
  TPU kernels are compiled, not yet timed on a chip; the CPU would interpret them)."""
  if kernels != "auto":
    return kernels
  return "pallas" if platform in ("gpu", "cuda", "rocm") else "xla"


# The kernels other platforms (the CPU) run in interpret mode; the tests switch it to pallas_tpu.
INTERPRETED = {"module": pallas_gpu}


def _per_platform(name: str, *args, **static):
  """``name`` from the module of the platform this program is lowered for."""
  gpu = functools.partial(getattr(pallas_gpu, name), interpret=False, **static)
  tpu = functools.partial(getattr(pallas_tpu, name), interpret=False, **static)
  interpreted = functools.partial(getattr(INTERPRETED["module"], name), interpret=True, **static)
  return lax.platform_dependent(*args, default=interpreted, cuda=gpu, rocm=gpu, tpu=tpu)


def gather_sum(rows: jax.Array, weights: jax.Array, table: jax.Array) -> jax.Array:
  """sum_k weights[n, k] * table[rows[n, k]]: [N, K], [N, K], [M, D] -> [N, D] float32."""
  return _per_platform("gather_sum", rows, weights, table)


def gather_dot(rows: jax.Array, g: jax.Array, table: jax.Array) -> jax.Array:
  """<g[n], table[rows[n, k]]>: [N, K], [N, D], [M, D] -> [N, K] float32."""
  return _per_platform("gather_dot", rows, g, table)


def scatter_rows(rows: jax.Array, weights: jax.Array, src: jax.Array, num_rows: int
                 ) -> jax.Array:
  """S^T src: [N, K] rows / weights, [N, D] src -> [num_rows, D] float32."""
  return _per_platform("scatter_rows", rows, weights, src, num_rows=num_rows)
