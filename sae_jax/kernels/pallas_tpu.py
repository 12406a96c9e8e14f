"""Pallas TPU (Mosaic) kernels for the sparse parts of the TopK SAE step.

Same three operations and contract as :mod:`sae_jax.kernels.pallas_gpu` (gathers: local rows
clamped into the table, zero weights for rows a shard does not own; scatter: row id M skips):

- :func:`gather_sum`: out[n] = sum_k w[n, k] * table[rows[n, k]] (the decode).
- :func:`gather_dot`: out[n, k] = <g[n], table[rows[n, k]]> (the decode's gradient to the values).
- :func:`scatter_rows`: out[m] = sum over rows[n, k] == m of w[n, k] * src[n] (weight gradients).

TPU has no scatter or gather of rows inside a kernel, so every kernel gathers the rows it needs
by DMA: the row ids sit in SMEM (blocks of the id array, or scalar prefetch), each id starts one
row copy from HBM into a VMEM buffer, and the arithmetic then runs on the MXU:

- decode: a block of BN tokens gathers its BN*K rows, and one [BN, BN*K] x [BN*K, D] matmul with
  the block-diagonal weights (built by XLA) sums each token's rows.
- gather-dot: the same rows, one [BN, D] x [D, BN*K] matmul against the tokens' cotangents, the
  block diagonal kept (XLA then sums the BN column groups).
- scatter: the (row, token) pairs are sorted by row and laid out by XLA so that each block of BM
  output rows owns whole chunks of C pairs (at least one, so every output block is written).
  The grid walks the chunks in order; the output block, picked by a scalar-prefetched chunk ->
  block table, stays in VMEM while consecutive chunks add to it, and a chunk gathers its C source
  rows and adds a one-hot [BM, C] x [C, D] matmul. No atomics are needed: one TensorCore runs
  the grid in order.

Matmuls run at HIGHEST precision (f32 passes), so results match the XLA path to float32
rounding. D is padded to a multiple of 128 and K to a multiple of 16 (so BN*K is whole lanes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

TOKEN_BLOCK = 8     # BN: tokens per grid step (gather kernels)
ROW_BLOCK = 8       # BM: output rows per block (scatter kernel)
PAIR_CHUNK = 128    # C: sorted pairs per grid step (scatter kernel)
K_CHUNK = 32        # KC: a token's rows per grid step when K > 32 (gather kernels)
F32 = jnp.float32
SMEM = pltpu.MemorySpace.SMEM
_HI = lax.Precision.HIGHEST


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads, constant_values=value)


def _dma_rows(ids_ref, table_hbm, buf, sem):
  """buf[j] = table[ids[j]] for every row j of buf, by one DMA per row (all in flight at once)."""
  count = buf.shape[0]

  def start(j, carry):
    pltpu.make_async_copy(table_hbm.at[pl.ds(ids_ref[j], 1)], buf.at[pl.ds(j, 1)], sem).start()
    return carry

  def wait(j, carry):
    pltpu.make_async_copy(table_hbm.at[pl.ds(0, 1)], buf.at[pl.ds(0, 1)], sem).wait()
    return carry

  lax.fori_loop(0, count, start, 0)
  lax.fori_loop(0, count, wait, 0)


def _as_rows_of_words(table: jax.Array) -> jax.Array:
  """A table whose single rows Mosaic can DMA: 32-bit elements (a bfloat16 row is half a packed
  sublane tile, which Mosaic cannot slice), padded to D' % 128 == 0. Narrow tables are widened
  to float32, a copy per call: the paper's parameters are float32, for which this is free."""
  if table.dtype.itemsize < 4:
    table = table.astype(F32)
  return _pad_to(table, 1, 128)


def _prepare(rows, table):
  """Rows padded to [N', K'] (N' % BN == 0; K' % 16 == 0 up to 32, else K' % 32 == 0) and
  reordered to (token block, K chunk, token, k); the table as :func:`_as_rows_of_words`.

  Returns (flat rows, table, K', K chunk). A grid step gathers BN*KC rows (at most 256: a
  [256, D] VMEM buffer), however large K is (AuxK's k_aux may be d_in / 2)."""
  k = rows.shape[1]
  kc = -(-k // 16) * 16 if k <= 32 else K_CHUNK
  rows = _pad_to(_pad_to(rows.astype(jnp.int32), 1, kc), 0, TOKEN_BLOCK)
  return _by_chunks(rows, kc).reshape(-1), _as_rows_of_words(table), rows.shape[1], kc


def _by_chunks(a: jax.Array, kc: int) -> jax.Array:
  """[N', K'] -> [N'/BN, K'/KC, BN, KC]."""
  n, k = a.shape
  return a.reshape(n // TOKEN_BLOCK, TOKEN_BLOCK, k // kc, kc).transpose(0, 2, 1, 3)


def _params(*semantics: str):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _gather_specs(kc: int, nc: int, second):
  """Row ids of grid step (i, c) from SMEM; ``second`` the block spec of the next input."""
  ids = pl.BlockSpec((TOKEN_BLOCK * kc,), lambda i, c: (i * nc + c,), memory_space=SMEM)
  return [ids, second, pl.BlockSpec(memory_space=pl.ANY)]


# --------------------------------------------------------------------------------------------
# Decode forward and its gradient to the values.


def _gather_sum_kernel(rows_ref, wbd_ref, table_hbm, out_ref, buf, sem):
  @pl.when(pl.program_id(1) == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  _dma_rows(rows_ref, table_hbm, buf, sem)
  out_ref[...] += jnp.dot(wbd_ref[...], buf[...].astype(F32), precision=_HI,
                          preferred_element_type=F32)


def _block_diagonal(weights: jax.Array, kc: int) -> jax.Array:
  """[N', K'] -> [N'*K'/KC, BN*KC]: per (token block, K chunk) a [BN, BN*KC] matrix holding
  token n's KC weights in column group n, zeros elsewhere."""
  w = _by_chunks(weights, kc)[:, :, :, None, :]
  eye = jnp.eye(TOKEN_BLOCK, dtype=F32)[None, None, :, :, None]
  return (w * eye).reshape(-1, TOKEN_BLOCK * TOKEN_BLOCK * kc).reshape(-1, TOKEN_BLOCK * kc)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_sum(rows: jax.Array, weights: jax.Array, table: jax.Array, *,
               interpret: bool = False) -> jax.Array:
  """sum_k weights[n, k] * table[rows[n, k]]: [N, K], [N, K], [M, D] -> [N, D] float32."""
  n, d = rows.shape[0], table.shape[1]
  flat, table, kp, kc = _prepare(rows, table)
  weights = _pad_to(_pad_to(weights.astype(F32), 1, kp), 0, TOKEN_BLOCK)
  n_pad, d_pad, nc = weights.shape[0], table.shape[1], kp // kc
  wide = TOKEN_BLOCK * kc
  cost = pl.CostEstimate(flops=2 * n_pad * nc * wide * d_pad, transcendentals=0,
                         bytes_accessed=n_pad * kp * (d_pad * table.dtype.itemsize + 4)
                         + n_pad * nc * wide * 4 + n_pad * d_pad * 4)
  out = pl.pallas_call(
      _gather_sum_kernel,
      out_shape=jax.ShapeDtypeStruct((n_pad, d_pad), F32),
      grid=(n_pad // TOKEN_BLOCK, nc),
      in_specs=_gather_specs(kc, nc, pl.BlockSpec((TOKEN_BLOCK, wide),
                                                  lambda i, c: (i * nc + c, 0))),
      out_specs=pl.BlockSpec((TOKEN_BLOCK, d_pad), lambda i, c: (i, 0)),
      scratch_shapes=[pltpu.VMEM((wide, d_pad), table.dtype), pltpu.SemaphoreType.DMA],
      compiler_params=_params("parallel", "arbitrary"), cost_estimate=cost,
      interpret=interpret, name="sae_gather_sum_tpu",
  )(flat, _block_diagonal(weights, kc), table)
  return out[:n, :d]


def _gather_dot_kernel(rows_ref, g_ref, table_hbm, out_ref, buf, sem):
  _dma_rows(rows_ref, table_hbm, buf, sem)
  full = lax.dot_general(g_ref[...].astype(F32), buf[...].astype(F32),
                         (((1,), (1,)), ((), ())), precision=_HI, preferred_element_type=F32)
  bn, wide = full.shape
  kc = wide // bn
  col = lax.broadcasted_iota(jnp.int32, full.shape, 1)
  row = lax.broadcasted_iota(jnp.int32, full.shape, 0)
  own = (col >= row * kc) & (col < (row + 1) * kc)
  out_ref[...] = jnp.where(own, full, 0.0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_dot(rows: jax.Array, g: jax.Array, table: jax.Array, *,
               interpret: bool = False) -> jax.Array:
  """<g[n], table[rows[n, k]]>: [N, K], [N, D], [M, D] -> [N, K] float32."""
  n, k = rows.shape
  flat, table, kp, kc = _prepare(rows, table)
  g = _pad_to(_pad_to(g.astype(F32), 1, 128), 0, TOKEN_BLOCK)
  n_pad, d_pad, nc = g.shape[0], table.shape[1], kp // kc
  wide = TOKEN_BLOCK * kc
  cost = pl.CostEstimate(flops=2 * n_pad * nc * wide * d_pad, transcendentals=0,
                         bytes_accessed=n_pad * kp * (d_pad * table.dtype.itemsize + 4)
                         + n_pad * nc * (d_pad * 4 + wide * 4))
  out = pl.pallas_call(
      _gather_dot_kernel,
      out_shape=jax.ShapeDtypeStruct((n_pad * nc, wide), F32),
      grid=(n_pad // TOKEN_BLOCK, nc),
      in_specs=_gather_specs(kc, nc, pl.BlockSpec((TOKEN_BLOCK, d_pad), lambda i, c: (i, 0))),
      out_specs=pl.BlockSpec((TOKEN_BLOCK, wide), lambda i, c: (i * nc + c, 0)),
      scratch_shapes=[pltpu.VMEM((wide, d_pad), table.dtype), pltpu.SemaphoreType.DMA],
      compiler_params=_params("parallel", "parallel"), cost_estimate=cost,
      interpret=interpret, name="sae_gather_dot_tpu",
  )(flat, g, table)
  # Only token n's own column group survived the mask: summing the groups reads it out.
  out = out.reshape(n_pad // TOKEN_BLOCK, nc, TOKEN_BLOCK, TOKEN_BLOCK, kc).sum(3)
  return out.transpose(0, 2, 1, 3).reshape(n_pad, kp)[:n, :k]


# --------------------------------------------------------------------------------------------
# Weight gradients: sorted pairs in chunks owned by blocks of output rows.


def chunk_layout(rows: jax.Array, weights: jax.Array, num_rows: int):
  """Sort the [N, K] (row, token) pairs by row into chunks of C owned by blocks of BM rows.

  Row ids are in [0, M]; pairs with row M (another shard's) are left out.
  Returns (chunk_block [T], first [T], tokens [T*C], local_rows [T, 1, C], weights [T, 1, C]) (a
  [1, C] block is whole in its last two dims, as Mosaic wants) with a
  static T = ceil(M / BM) + ceil(N*K / C): chunk t adds to output block chunk_block[t], starting
  it from zero when first[t] == 1 (0: it adds to the block of chunk t-1; -1: an unused trailing
  chunk, of the last block). Blocks come in increasing order, each with at least one chunk;
  padding pairs have weight 0.
  """
  n, k = rows.shape
  pairs, nb = n * k, -(-num_rows // ROW_BLOCK)
  total = nb + -(-pairs // PAIR_CHUNK)
  s_rows, s_ids = lax.sort((rows.reshape(-1).astype(jnp.int32), lax.iota(jnp.int32, pairs)),
                           num_keys=1)
  blk = jnp.where(s_rows < num_rows, s_rows // ROW_BLOCK, nb)
  starts = jnp.searchsorted(blk, jnp.arange(nb + 1, dtype=jnp.int32)).astype(jnp.int32)
  n_chunks = jnp.maximum(1, -(-(starts[1:] - starts[:-1]) // PAIR_CHUNK))
  first_chunk = jnp.cumsum(n_chunks) - n_chunks  # [nb]
  slots = total * PAIR_CHUNK
  safe_blk = jnp.minimum(blk, nb - 1)
  pos = first_chunk[safe_blk] * PAIR_CHUNK + lax.iota(jnp.int32, pairs) - starts[safe_blk]
  pos = jnp.where(blk < nb, pos, slots)  # left-out pairs: dropped below

  def place(values, dtype):
    return jnp.zeros((slots,), dtype).at[pos].set(values.astype(dtype), mode="drop",
                                                  unique_indices=True)

  tokens = place(s_ids // k, jnp.int32)
  local = place(s_rows - blk * ROW_BLOCK, jnp.int32).reshape(total, 1, PAIR_CHUNK)
  w = place(weights.reshape(-1)[s_ids], F32).reshape(total, 1, PAIR_CHUNK)
  t = jnp.arange(total, dtype=jnp.int32)
  chunk_block = jnp.clip(jnp.searchsorted(first_chunk, t, side="right") - 1, 0, nb - 1)
  first = jnp.where(t < jnp.sum(n_chunks), (first_chunk[chunk_block] == t).astype(jnp.int32),
                    -1)
  return chunk_block.astype(jnp.int32), first, tokens, local, w


def _scatter_kernel(block_ref, first_ref, tok_ref, local_ref, w_ref, src_hbm, out_ref, buf,
                    sem):
  del block_ref  # used by the output's index map
  j = pl.program_id(0)

  @pl.when(first_ref[j] == 1)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  @pl.when(first_ref[j] >= 0)
  def _():
    _dma_rows(tok_ref, src_hbm, buf, sem)
    bm, c = out_ref.shape[0], buf.shape[0]
    onehot = jnp.where(lax.broadcasted_iota(jnp.int32, (bm, c), 0) == local_ref[...],
                       w_ref[...], 0.0)
    out_ref[...] += jnp.dot(onehot, buf[...].astype(F32), precision=_HI,
                            preferred_element_type=F32)


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
  d = src.shape[1]
  src = _as_rows_of_words(src)
  d_pad = src.shape[1]
  chunk_block, first, tokens, local, w = chunk_layout(rows, weights, num_rows)
  total = first.shape[0]
  m_pad = -(-num_rows // ROW_BLOCK) * ROW_BLOCK
  cost = pl.CostEstimate(flops=2 * total * ROW_BLOCK * PAIR_CHUNK * d_pad, transcendentals=0,
                         bytes_accessed=total * PAIR_CHUNK * (d_pad * src.dtype.itemsize + 12)
                         + m_pad * d_pad * 4)
  chunk_spec = pl.BlockSpec((None, 1, PAIR_CHUNK), lambda t, blk, first: (t, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(total,),
      in_specs=[pl.BlockSpec((PAIR_CHUNK,), lambda t, blk, first: (t,), memory_space=SMEM),
                chunk_spec, chunk_spec, pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((ROW_BLOCK, d_pad), lambda t, blk, first: (blk[t], 0)),
      scratch_shapes=[pltpu.VMEM((PAIR_CHUNK, d_pad), src.dtype), pltpu.SemaphoreType.DMA])
  out = pl.pallas_call(
      _scatter_kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, d_pad), F32),
      grid_spec=grid_spec,
      compiler_params=_params("arbitrary"), cost_estimate=cost, interpret=interpret,
      name="sae_scatter_rows_tpu",
  )(chunk_block, first, tokens, local, w, src)
  return out[:num_rows, :d]
