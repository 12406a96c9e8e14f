"""Pallas GPU (Triton lowering) kernels for the sparse parts of the TopK SAE step.

Axes: N tokens, D model width, M latent rows of the table (one shard's), K selected rows per
token. The gathers take *local* row ids clamped into [0, M) with the weight of a row the shard
does not own set to zero; the scatter takes row id M for such a pair and skips it (see
``sae_jax.kernels.sparse_ops``). So sharding is the caller's business and a kernel only ever
touches its own table.

- :func:`gather_sum`: out[n] = sum_k w[n, k] * table[rows[n, k]] (the decode, an embedding bag).
- :func:`gather_dot`: out[n, k] = <g[n], table[rows[n, k]]> (the decode's gradient to the values).
- :func:`scatter_rows`: out[m] = sum over (n, k) with rows[n, k] == m of w[n, k] * src[n]
  (S^T src: the decoder's weight gradient with src = g, the encoder's, transposed, with src = x).
  The (row, token) pairs are sorted by row; each program walks a chunk of sorted pairs
  accumulating one output row in registers and atomically adds it out when the row changes
  (the layout of OpenAI's / EleutherAI sparsify's Triton kernels; written anew here), so a hot
  latent is split over many programs instead of serialising one.

Triton wants every array a kernel touches to have a power-of-two size, so the wrappers pad K to a
power of two (zero weights), N to the token block and D to the column block; padding is sliced
off the results. ``interpret=True`` runs the same kernels on any backend (the tests' CPU path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TOKEN_BLOCK = 16     # tokens per program (gather kernels)
COL_BLOCK = 256      # columns of D per program / per inner step
PAIR_CHUNK = 64      # sorted (row, token) pairs per program (scatter kernel)
K_BLOCK = 32         # selected rows per program (gather-dot)
F32 = jnp.float32


def _pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _col_block(d: int) -> int:
  return min(COL_BLOCK, _pow2(d))


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads, constant_values=value)


def _params(num_warps: int = 4, num_stages: int = 2):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad_pairs(rows: jax.Array, weights: jax.Array, block_n: int):
  """[N, K] rows / weights -> padded to [N', K'] (K' a power of two, N' % block_n == 0)."""
  k = rows.shape[1]
  rows = _pad_to(_pad_to(rows.astype(jnp.int32), 1, _pow2(k)), 0, block_n)
  weights = _pad_to(_pad_to(weights.astype(F32), 1, _pow2(k)), 0, block_n)
  return rows, weights


# --------------------------------------------------------------------------------------------
# Decode forward: gather-sum.


def _gather_sum_kernel(rows_ref, w_ref, table_ref, out_ref):
  bn, bd = out_ref.shape
  cols = pl.ds(pl.program_id(1) * bd, bd)

  def body(k, acc):
    r = rows_ref[:, k]
    return acc + w_ref[:, k][:, None] * table_ref[r, cols].astype(F32)

  out_ref[...] = lax.fori_loop(0, rows_ref.shape[1], body, jnp.zeros((bn, bd), F32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_sum(rows: jax.Array, weights: jax.Array, table: jax.Array, *,
               interpret: bool = False) -> jax.Array:
  """sum_k weights[n, k] * table[rows[n, k]]: [N, K], [N, K], [M, D] -> [N, D] float32."""
  n, k = rows.shape
  d = table.shape[1]
  bd = _col_block(d)
  rows, weights = _pad_pairs(rows, weights, TOKEN_BLOCK)
  table = _pad_to(table, 1, bd)
  n_pad, kp = rows.shape
  grid = (n_pad // TOKEN_BLOCK, table.shape[1] // bd)
  item = table.dtype.itemsize
  cost = pl.CostEstimate(flops=2 * n * k * d, transcendentals=0,
                         bytes_accessed=n * k * (d * item + 8) + n * d * 4)
  out = pl.pallas_call(
      _gather_sum_kernel,
      out_shape=jax.ShapeDtypeStruct((n_pad, table.shape[1]), F32),
      grid=grid,
      in_specs=[pl.BlockSpec((TOKEN_BLOCK, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((TOKEN_BLOCK, kp), lambda i, j: (i, 0)),
                pl.no_block_spec],
      out_specs=pl.BlockSpec((TOKEN_BLOCK, bd), lambda i, j: (i, j)),
      compiler_params=_params(), cost_estimate=cost, interpret=interpret,
      name="sae_gather_sum",
  )(rows, weights, table)
  return out[:n, :d]


# --------------------------------------------------------------------------------------------
# Decode backward to the values: gather-dot.


def _gather_dot_kernel(rows_ref, g_ref, table_ref, out_ref, *, bd):
  bn, kp = out_ref.shape
  tokens = pl.ds(pl.program_id(0) * bn, bn)
  column = lax.broadcasted_iota(jnp.int32, (bn, kp), 1)

  # Columns outermost: each [BN, BD] slice of g is loaded once and meets the K gathered slices;
  # the K dot products land in a [BN, K] register tile.
  def per_chunk(c, acc):
    cols = pl.ds(c * bd, bd)
    g = g_ref[tokens, cols].astype(F32)

    def per_k(k, acc):
      dots = jnp.sum(g * table_ref[rows_ref[:, k], cols].astype(F32), axis=1)
      return acc + jnp.where(column == k, dots[:, None], 0.0)

    return lax.fori_loop(0, kp, per_k, acc)

  out_ref[...] = lax.fori_loop(0, g_ref.shape[1] // bd, per_chunk, jnp.zeros((bn, kp), F32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_dot(rows: jax.Array, g: jax.Array, table: jax.Array, *,
               interpret: bool = False) -> jax.Array:
  """<g[n], table[rows[n, k]]>: [N, K], [N, D], [M, D] -> [N, K] float32."""
  n, k = rows.shape
  d = table.shape[1]
  bd = _col_block(d)
  rows, _ = _pad_pairs(rows, jnp.zeros(rows.shape, F32), TOKEN_BLOCK)
  g = _pad_to(_pad_to(g.astype(F32), 1, bd), 0, TOKEN_BLOCK)
  table = _pad_to(table, 1, bd)
  n_pad, kp = rows.shape
  kb = min(kp, K_BLOCK)  # bounds the [BN, KB] register tile (AuxK's K may be d_in / 2)
  item = table.dtype.itemsize
  cost = pl.CostEstimate(flops=2 * n * k * d, transcendentals=0,
                         bytes_accessed=n * k * (d * item + 8) + n * d * 4 * (kp // kb))
  out = pl.pallas_call(
      functools.partial(_gather_dot_kernel, bd=bd),
      out_shape=jax.ShapeDtypeStruct((n_pad, kp), F32),
      grid=(n_pad // TOKEN_BLOCK, kp // kb),
      in_specs=[pl.BlockSpec((TOKEN_BLOCK, kb), lambda i, j: (i, j)),
                pl.no_block_spec, pl.no_block_spec],
      out_specs=pl.BlockSpec((TOKEN_BLOCK, kb), lambda i, j: (i, j)),
      compiler_params=_params(), cost_estimate=cost, interpret=interpret,
      name="sae_gather_dot",
  )(rows, g, table)
  return out[:n, :k]


# --------------------------------------------------------------------------------------------
# Weight gradients: sparse-transpose-dense (S^T src) with sorted pairs and atomic row adds.


def sorted_pairs(rows: jax.Array, weights: jax.Array, chunk: int, num_rows: int):
  """Flatten [N, K] pairs (row ids in [0, num_rows]), sort them by row, pad to ``chunk``s.

  Returns (rows, tokens, weights) [P'] with P' = ceil(N*K / chunk) * chunk, and [1] the count
  of pairs with a row < num_rows (they come first). Skipped and padding pairs carry row
  num_rows - 1 (>= every row, so the order holds) and weight 0.
  """
  n, k = rows.shape
  flat_rows = rows.reshape(-1).astype(jnp.int32)
  pair_ids = lax.iota(jnp.int32, n * k)
  s_rows, s_ids = lax.sort((flat_rows, pair_ids), num_keys=1)
  valid = s_rows < num_rows
  s_w = jnp.where(valid, weights.reshape(-1).astype(F32)[s_ids], 0.0)
  s_rows = jnp.minimum(s_rows, num_rows - 1)
  s_tok = s_ids // k
  n_valid = jnp.sum(valid, dtype=jnp.int32).reshape(1)
  return (_pad_to(s_rows, 0, chunk, num_rows - 1), _pad_to(s_tok, 0, chunk),
          _pad_to(s_w, 0, chunk), n_valid)


def _scatter_kernel(n_valid_ref, rows_ref, tok_ref, w_ref, src_ref, zeros_ref, out_ref, *, bd):
  del zeros_ref  # the same buffer as out_ref (aliased): the zero-initialised output
  # Chunks holding only skipped pairs (other shards' rows, padding) have nothing to add.
  # (program_id is read out here: interpret mode cannot evaluate it inside the branch.)
  cols = pl.ds(pl.program_id(1) * bd, bd)
  pl.when(pl.program_id(0) * rows_ref.shape[0] < n_valid_ref[0])(
      functools.partial(_scatter_chunk, rows_ref, tok_ref, w_ref, src_ref, out_ref, cols, bd))


def _scatter_chunk(rows_ref, tok_ref, w_ref, src_ref, out_ref, cols, bd):

  def flush(row, acc):
    plgpu.atomic_add(out_ref, (row, cols), acc)

  def body(i, carry):
    acc, cur = carry
    r = rows_ref[i]
    changed = r != cur

    @pl.when(changed)
    def _():
      flush(cur, acc)

    acc = jnp.where(changed, jnp.zeros_like(acc), acc)
    acc = acc + w_ref[i] * src_ref[tok_ref[i], cols].astype(F32)
    return acc, r

  acc, cur = lax.fori_loop(0, rows_ref.shape[0], body, (jnp.zeros((bd,), F32), rows_ref[0]))
  flush(cur, acc)


@functools.partial(jax.jit, static_argnames=("num_rows", "interpret"))
def scatter_rows(rows: jax.Array, weights: jax.Array, src: jax.Array, num_rows: int, *,
                 interpret: bool = False) -> jax.Array:
  """S^T src: out[m] = sum_{rows[n, k] == m} weights[n, k] * src[n].

  Args:
    rows: [N, K] int32 in [0, num_rows]; a pair with row num_rows is skipped (another shard's).
    weights: [N, K]; src: [N, D].
    num_rows: M, the output's rows.

  Returns:
    [M, D] float32.
  """
  n, k = rows.shape
  d = src.shape[1]
  bd = _col_block(d)
  s_rows, s_tok, s_w, n_valid = sorted_pairs(rows, weights, PAIR_CHUNK, num_rows)
  src = _pad_to(src, 1, bd)
  d_pad = src.shape[1]
  grid = (s_rows.shape[0] // PAIR_CHUNK, d_pad // bd)
  pair_spec = pl.BlockSpec((PAIR_CHUNK,), lambda i, j: (i,))
  item = src.dtype.itemsize
  cost = pl.CostEstimate(flops=2 * n * k * d, transcendentals=0,
                         bytes_accessed=n * k * (d * item + 12) + 2 * num_rows * d * 4)
  out = pl.pallas_call(
      functools.partial(_scatter_kernel, bd=bd),
      out_shape=jax.ShapeDtypeStruct((num_rows, d_pad), F32),
      grid=grid,
      in_specs=[pl.no_block_spec, pair_spec, pair_spec, pair_spec, pl.no_block_spec,
                pl.no_block_spec],
      out_specs=pl.no_block_spec,
      input_output_aliases={5: 0},
      compiler_params=_params(), cost_estimate=cost, interpret=interpret,
      name="sae_scatter_rows",
  )(n_valid, s_rows, s_tok, s_w, src, jnp.zeros((num_rows, d_pad), F32))
  return out[:, :d]
