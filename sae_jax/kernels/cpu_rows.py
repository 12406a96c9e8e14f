"""The row operations of ``rows.py`` as XLA FFI custom calls for the CPU (``cpu_rows.cc``).

XLA's CPU form of a gather-sum / gather-dot / scatter-add over J selected columns is a loop of J
[N, D] passes (with AuxK's J = 256, most of the AuxK step). These kernels finish each output row
in one pass, split over XLA's intra-op thread pool, in float32. They are built with the other
CPU kernels (``cpu_ffi``); with ``SAE_JAX_CPU_ROWS=0`` or no compiler ``rows.py`` keeps its scan.
Call them only in code compiled for the CPU (``rows.py`` does so under ``platform_dependent``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.kernels import cpu_ffi

_TARGETS = {"sae_jax_cpu_gather_sum": "SaeJaxGatherSum",
            "sae_jax_cpu_gather_dot": "SaeJaxGatherDot",
            "sae_jax_cpu_scatter_rows": "SaeJaxScatterRows",
            "sae_jax_cpu_scatter_cols": "SaeJaxScatterCols",
            "sae_jax_cpu_decode_pair_backward": "SaeJaxDecodePairBackward"}


def available() -> bool:
  """Whether the FFI row kernels are built and registered (False with ``SAE_JAX_CPU_ROWS=0``)."""
  return cpu_ffi.register("SAE_JAX_CPU_ROWS", _TARGETS)


def _call(target: str, shape: tuple[int, ...], *args):
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  # "sequential": the kernels take exactly rank-2 operands, so a vmapped call loops.
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args)


def gather_sum(rows: jax.Array, weights: jax.Array, table: jax.Array) -> jax.Array:
  """sum_j weights[n, j] * table[rows[n, j]]: [N, J] int, [N, J], [M, D] -> [N, D] float32.

  Row ids outside [0, M) read the nearest valid row (their weights must be zero); any float
  dtype of weights / table is read as float32.
  """
  n, d = rows.shape[0], table.shape[1]
  return _call("sae_jax_cpu_gather_sum", (n, d), rows.astype(jnp.int32),
               weights.astype(jnp.float32), table.astype(jnp.float32))


def gather_dot(rows: jax.Array, g: jax.Array, table: jax.Array) -> jax.Array:
  """<g[n], table[rows[n, j]]>: [N, J] int, [N, D], [M, D] -> [N, J] float32.

  Row ids outside [0, M) read the nearest valid row: mask those entries afterwards.
  """
  return _call("sae_jax_cpu_gather_dot", rows.shape, rows.astype(jnp.int32),
               g.astype(jnp.float32), table.astype(jnp.float32))


def scatter_rows(rows: jax.Array, weights: jax.Array, source: jax.Array, m: int) -> jax.Array:
  """sum_j weights[n, j] * source[n] into row rows[n, j] of an [m, D] float32 zero array.

  rows, weights: [N, J]; source: [N, D]. Row ids outside [0, m) are dropped. Each row is summed
  on one thread in (n, j) order, so the result does not depend on the thread schedule.
  """
  return _call("sae_jax_cpu_scatter_rows", (m, source.shape[1]), rows.astype(jnp.int32),
               weights.astype(jnp.float32), source.astype(jnp.float32))


def scatter_cols(rows: jax.Array, weights: jax.Array, source: jax.Array, m: int) -> jax.Array:
  """:func:`scatter_rows` written transposed, as columns of a [D, m] float32 array (no [m, D]
  array and transpose: the encoder's weight gradient is used as W_enc [D, M])."""
  return _call("sae_jax_cpu_scatter_cols", (source.shape[1], m), rows.astype(jnp.int32),
               weights.astype(jnp.float32), source.astype(jnp.float32))


def decode_pair_backward(rows: jax.Array, vals: jax.Array, g0: jax.Array, g1: jax.Array,
                         table: jax.Array, split: int) -> tuple[jax.Array, jax.Array]:
  """Two sparse decodes' backward in one call (the TopK and the AuxK codes, one table).

  rows, vals: [N, J], columns [0, split) decoded against cotangent g0 [N, D], the rest against
  g1 [N, D]; table [M, D]; row ids outside [0, M) not owned. Returns float32 d_vals [N, J]
  (:func:`gather_dot` with each column's cotangent where owned, else 0) and d_table [M, D]
  (:func:`scatter_rows` of vals, each pair's source row from its column's cotangent).
  """
  m, d = table.shape
  out = (jax.ShapeDtypeStruct(rows.shape, jnp.float32), jax.ShapeDtypeStruct((m, d), jnp.float32))
  f32 = lambda a: a.astype(jnp.float32)
  return jax.ffi.ffi_call("sae_jax_cpu_decode_pair_backward", out, vmap_method="sequential")(
      rows.astype(jnp.int32), f32(vals), f32(g0), f32(g1), f32(table), split=np.int64(split))
