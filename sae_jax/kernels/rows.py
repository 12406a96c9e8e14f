"""Row gathers and scatter-adds of the sparse kernels, in a CPU and an accelerator form.

Axes: N tokens, J selected latents per token (k or k_aux), D model width, M_l latent rows.
Every function takes ``rows_of`` [N, J] local row ids (M_l marks "not owned": dropped or
contributing zero) and is lowered per platform:

- CPU: the C++ FFI kernels of ``cpu_rows`` (each output row in one pass, multi-threaded;
  measured at N=4096 D=512 J=256: gather_sum 2.7x, gather_dot 5.6x, scatter_rows 9x faster than
  the scan below, ``experiments/benchmarks/cpu_kernels.py``). Without them
  (``SAE_JAX_CPU_ROWS=0``, no compiler, or a scatter into a non-float32 array): a scan over J of
  [N, D] gathers / scatter-adds, several times faster than one [N*K, D] gather (measured:
  5.6 ms vs 80 ms at N=4096 D=512 K=32).
- Two more for the train step: ``scatter_cols`` (scatter_rows written as [D, M_l] columns, the
  encoder gradient's layout) and ``decode_pair_backward`` (the TopK and AuxK decodes' backward
  as one CPU call; elsewhere the gather-dots and scatters below).
- GPU/TPU: a scan over groups of G columns, each one [N*G, D] gather or scatter-add, G chosen so
  a group's rows hold about GROUP_BYTES[platform] (TPU: small, its HBM is 16 GB a chip and the
  planner holds temp memory to half the pre-activations' share). A per-column scan there re-reads and
  re-writes the [N, D] accumulator J times (measured on an H200 at the paper's shape: the
  sparse parts took 34 ms of a 40 ms step against 6 ms for the encoder matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels import cpu_rows

# Bytes of gathered rows (N*G*D float32) one group may hold, per platform. A benchmark knob.
GROUP_BYTES = {"gpu": 1 << 30, "tpu": 32 << 20}


def group_size(n: int, j: int, d: int, platform: str) -> int:
  """Columns per loop trip: 1 on the CPU, else as many as GROUP_BYTES[platform] allows."""
  if platform == "cpu":
    return 1
  return max(1, min(j, GROUP_BYTES[platform] // (4 * max(n * d, 1))))


def _groups(rows_of: jax.Array, weights: jax.Array | None, g: int, m_local: int):
  """[N, J] -> [T, N, g] (T = ceil(J/g)); padded columns: row m_local, weight 0."""
  n, j = rows_of.shape
  pad = -j % g
  rows = jnp.pad(rows_of, ((0, 0), (0, pad)), constant_values=m_local)
  rows = rows.reshape(n, -1, g).transpose(1, 0, 2)
  if weights is None:
    return rows, None
  w = jnp.pad(weights, ((0, 0), (0, pad))).reshape(n, -1, g).transpose(1, 0, 2)
  return rows, w


def _per_platform(fn, *args):
  """fn(*args, platform=...) lowered with the form of the platform it is compiled for."""
  return lax.platform_dependent(*args, cpu=functools.partial(fn, platform="cpu"),
                                tpu=functools.partial(fn, platform="tpu"),
                                default=functools.partial(fn, platform="gpu"))


def _scatter_rows(rows_of, weights, source, m_local, dtype, platform):
  if platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu_rows.available():
    return cpu_rows.scatter_rows(rows_of, weights, source, m_local)
  n, j = rows_of.shape
  d = source.shape[-1]
  g = group_size(n, j, d, platform)
  # Materialise the loop inputs: left fusable, XLA recomputes their producers inside the loop
  # (measured on CPU: 39 ms instead of 21 ms for N=4096, D=512, M=8192, K=32).
  rows, w = _groups(rows_of, weights, g, m_local)
  rows, w, source = lax.optimization_barrier((rows, w, source))

  def body(acc, rw):
    r, wt = rw  # [N, g]
    upd = (wt[:, :, None] * source[:, None, :]).astype(dtype).reshape(n * g, d)
    return acc.at[r.reshape(-1)].add(upd, mode="drop"), None

  acc = jnp.zeros((m_local, d), dtype)
  return lax.scan(body, acc, (rows, w))[0]


def scatter_rows(rows_of: jax.Array, weights: jax.Array, source: jax.Array, m_local: int,
                 dtype) -> jax.Array:
  """sum_j weights[n, j] * source[n] into row rows_of[n, j] of an [m_local, D] zero array.

  rows_of, weights: [N, J]; source: [N, D]. Rows equal to m_local (not owned) are dropped.
  """
  fn = functools.partial(_scatter_rows, m_local=m_local, dtype=dtype)
  return _per_platform(fn, rows_of, weights, source)


def _scatter_cols(rows_of, weights, source, m_local, dtype, platform):
  if platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu_rows.available():
    return cpu_rows.scatter_cols(rows_of, weights, source, m_local)
  return _scatter_rows(rows_of, weights, source, m_local, dtype, platform).T


def scatter_cols(rows_of: jax.Array, weights: jax.Array, source: jax.Array, m_local: int,
                 dtype) -> jax.Array:
  """:func:`scatter_rows` transposed: [N, J], [N, J], [N, D] -> [D, m_local].

  The CPU kernel writes the columns directly; elsewhere XLA transposes the rows' result.
  """
  fn = functools.partial(_scatter_cols, m_local=m_local, dtype=dtype)
  return _per_platform(fn, rows_of, weights, source)


def _gather_sum(rows_of, weights, table, platform):
  if platform == "cpu" and cpu_rows.available():
    return cpu_rows.gather_sum(rows_of, weights, table)
  n, j = rows_of.shape
  m_local, d = table.shape
  g = group_size(n, j, d, platform)
  rows, w = _groups(jnp.minimum(rows_of, m_local - 1), weights, g, m_local - 1)
  rows, w = lax.optimization_barrier((rows, w))  # see _scatter_rows

  def body(acc, rw):
    r, wt = rw
    if g == 1:  # the CPU form: an elementwise product, no size-1 contraction
      return acc + wt[:, 0, None] * table[r[:, 0]].astype(jnp.float32), None
    return acc + jnp.einsum("ng,ngd->nd", wt, table[r].astype(jnp.float32)), None

  acc = jnp.zeros((n, d), jnp.float32)
  return lax.scan(body, acc, (rows, w.astype(jnp.float32)))[0]


def gather_sum(rows_of: jax.Array, weights: jax.Array, table: jax.Array) -> jax.Array:
  """sum_j weights[n, j] * table[rows_of[n, j]]: [N, J], [N, J], [M_l, D] -> [N, D] float32.

  Row ids >= M_l read the last row: their weights must be zero.
  """
  return _per_platform(_gather_sum, rows_of, weights, table)


def _gather_dot(rows_of, g_rows, table, platform):
  if platform == "cpu" and cpu_rows.available():
    return cpu_rows.gather_dot(rows_of, g_rows, table)
  n, j = rows_of.shape
  m_local, d = table.shape
  grp = group_size(n, j, d, platform)
  rows, _ = _groups(jnp.minimum(rows_of, m_local - 1), None, grp, m_local - 1)
  rows, g_rows = lax.optimization_barrier((rows, g_rows))  # see _scatter_rows

  def body(_, r):
    if grp == 1:
      return None, jnp.einsum("nd,nd->n", g_rows, table[r[:, 0]].astype(jnp.float32))[:, None]
    return None, jnp.einsum("nd,ngd->ng", g_rows, table[r].astype(jnp.float32))

  dots = lax.scan(body, None, rows)[1]  # [T, N, grp]
  return dots.transpose(1, 0, 2).reshape(n, -1)[:, :j]


def gather_dot(rows_of: jax.Array, g_rows: jax.Array, table: jax.Array) -> jax.Array:
  """<g_rows[n], table[rows_of[n, j]]>: [N, J], [N, D] float32, [M_l, D] -> [N, J] float32.

  Row ids >= M_l read the last row: mask those entries afterwards.
  """
  return _per_platform(_gather_dot, rows_of, g_rows, table)


def _decode_pair_backward(rows_of, weights, g0, g1, table, split, platform):
  if platform == "cpu" and cpu_rows.available():
    return cpu_rows.decode_pair_backward(rows_of, weights, g0, g1, table, split)
  m_local = table.shape[0]
  owned = rows_of < m_local
  parts = [(rows_of[:, :split], weights[:, :split], g0),
           (rows_of[:, split:], weights[:, split:], g1)]
  dots = jnp.concatenate([_gather_dot(r, g, table, platform) for r, _, g in parts], axis=1)
  d_table = sum(_scatter_rows(r, w, g, m_local, jnp.float32, platform) for r, w, g in parts)
  return jnp.where(owned, dots, 0.0), d_table


def decode_pair_backward(rows_of: jax.Array, weights: jax.Array, g0: jax.Array, g1: jax.Array,
                         table: jax.Array, split: int) -> tuple[jax.Array, jax.Array]:
  """Backward of two sparse decodes sharing ``table``: columns [0, split) against g0, the rest
  against g1. rows_of, weights: [N, J]; g0, g1: [N, D] float32; table: [M_l, D].

  Returns d_weights [N, J] float32 (<g[n], table[row]> where owned, else 0) and d_table
  [M_l, D] float32 (sum_j weights[n, j] g[n] into row rows_of[n, j]). On the CPU one FFI call
  (``cpu_rows.decode_pair_backward``); elsewhere :func:`gather_dot` and :func:`scatter_rows`.
  """
  fn = functools.partial(_decode_pair_backward, split=split)
  return _per_platform(fn, rows_of, weights, g0, g1, table)
