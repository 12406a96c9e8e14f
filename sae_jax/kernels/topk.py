"""Fused TopK encode and sparse decode with sparse backward passes (XLA ``custom_vjp``).

Axes: N tokens, D model width (d_in), M latents (d_sae; M_l the latents held by this shard),
K active latents per token.

Both kernels work on one latent shard: called inside ``shard_map`` with ``axis_name`` set, each
device holds W_enc[:, M_l] / W_dec[M_l, :] / b_enc[M_l] and the latent indices are global. The
encode merges per-shard top-k candidates with one all-gather, so every shard returns the same
global (values, indices) as a single device would. The decode and both backward passes only touch
the rows a shard owns; the caller sums partial reconstructions over the latent axis.

Backward passes never form an [N, M] array: the encoder gradient is a scatter-add of N*K rows
into W_enc's selected columns, the decoder gradient a scatter-add of N*K rows into W_dec (the
row operations, in a CPU and an accelerator form, are in ``rows.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels import cpu_topk, sparse_ops
from sae_jax.kernels import rows as row_ops


class TopKCodes(NamedTuple):
  """Sparse codes of a batch: values/indices [N, K] and the AuxK ones [N, K_aux]."""

  values: jax.Array
  indices: jax.Array
  aux_values: jax.Array
  aux_indices: jax.Array


def shard_offset(m_local: int, axis_name: str | None) -> jax.Array | int:
  """Global index of this shard's first latent (0 when unsharded)."""
  if axis_name is None:
    return 0
  return lax.axis_index(axis_name) * m_local


def local_top_k(x: jax.Array, k: int, bias: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """Exact top-k along the last axis of x (+ bias [M]): [N, M] -> [N, k] values, int32 indices.

  On CPU, the FFI kernel of ``cpu_topk`` (one thresholded pass per row, multi-threaded; it adds
  the bias row by row, so x + bias is never written) when it could be built; elsewhere, or
  without it, XLA's top-k via :func:`_block_top_k`.
  """
  plus = _adder(bias)
  if x.dtype == jnp.float32 and cpu_topk.available():
    return lax.platform_dependent(x, cpu=lambda x: cpu_topk.ffi_top_k(x, k, bias),
                                  default=lambda x: _block_top_k(plus(x), k))
  return _block_top_k(plus(x), k)


def _adder(bias: jax.Array | None):
  """x -> x + bias (x itself without a bias)."""
  return (lambda x: x) if bias is None else (lambda x: x + bias)


def masked_top_k(x: jax.Array, mask: jax.Array, k: int, bias: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """:func:`local_top_k` of ``where(mask, x (+ bias), -inf)``: [N, M], bool [M], [M] or None ->
  [N, k] values, indices.

  On CPU the FFI kernel reads the mask itself (no masked [N, M] copy is written).
  """
  plus = _adder(bias)

  def xla(x, mask):
    return _block_top_k(jnp.where(mask[None, :], plus(x), -jnp.inf), k)

  if x.dtype == jnp.float32 and cpu_topk.available():
    return lax.platform_dependent(
        x, mask, cpu=lambda x, m: cpu_topk.ffi_masked_top_k(x, m, k, bias), default=xla)
  return xla(x, mask)


def _block_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k with XLA ops only.

  XLA's CPU top-k costs a partial sort per row. When M is large, first reduce blocks of B
  latents to their maximum: every top-k element lies in one of the k blocks with the largest
  maxima (k blocks with larger maxima would hold k larger elements), so an exact top-k of those
  k*B candidates is the exact answer at a fraction of the selection work.
  """
  n, m = x.shape
  block = 16
  if m % block or m // block < 4 * k:
    vals, idx = lax.top_k(x, k)
    return vals, idx.astype(jnp.int32)
  blocks = x.reshape(n, m // block, block)
  _, block_idx = lax.top_k(blocks.max(axis=-1), k)  # [N, k]
  cand = jnp.take_along_axis(blocks, block_idx[:, :, None], axis=1).reshape(n, k * block)
  vals, pos = lax.top_k(cand, k)
  idx = jnp.take_along_axis(block_idx, pos // block, axis=1) * block + pos % block
  return vals, idx.astype(jnp.int32)


def select_topk(pre: jax.Array, k: int, axis_name: str | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """Top-k of pre-activations over all latents, sharded or not.

  Args:
    pre: [N, M_l] this shard's pre-activations.
    k: how many to keep per token.
    axis_name: the mesh axis the latents are split over (inside ``shard_map``), or None.

  Returns:
    values [N, k] (descending) and global latent indices [N, k] int32, identical on every shard
    and equal to the unsharded result.
  """
  m_local = pre.shape[-1]
  vals, idx = local_top_k(pre, min(k, m_local))
  return _merge_shards(vals, idx, k, m_local, axis_name)


def owned_rows(indices: jax.Array, m_local: int, axis_name: str | None):
  """Local row of each global index and whether this shard owns it (non-owned -> m_local)."""
  local = indices - shard_offset(m_local, axis_name)
  owned = (local >= 0) & (local < m_local)
  return jnp.where(owned, local, m_local), owned


# --------------------------------------------------------------------------------------------
# Fused encode.


# Pre-activation bytes one encoder chunk may hold on an accelerator: big enough that each
# chunk's matmul fills the chip, small enough that the full [N, M] array is never formed (the
# paper's step: 32,768 x 32,768 float32 pre-activations would be 4 GiB). On an H200 the step
# took the same time with 256 MB to 4 GB chunks and 6 % longer with 64 MB; a TPU chip keeps
# its temp memory below half its share of the pre-activations. A benchmark knob.
CHUNK_BYTES = {"gpu": 256 << 20, "tpu": 32 << 20}


def _row_chunk(n: int, m_local: int, platform: str = "cpu") -> int:
  """Rows per encoder chunk (a power of two, at most n).

  CPU: keep the [rows, M_l] pre-activations near 8 MB (cache-sized): selecting from a chunk
  while it is still in cache made encode + top-k 1.5x faster (N=4096, M=8192: 121 ms vs
  186 ms). GPU/TPU: chunks of about CHUNK_BYTES[platform], so the loop has few trips.
  """
  if platform == "cpu":
    target = max(64, min(1024, (2 << 20) // max(m_local, 1)))
  else:
    target = max(64, CHUNK_BYTES[platform] // 4 // max(m_local, 1))
  chunk = 1 << (target.bit_length() - 1)
  return min(chunk, max(n, 1))


def _encode_select(xc, W_enc, b_enc, aux_mask, k, k_aux, compute_dtype, platform=None):
  """Local top-k (and AuxK top-k among aux_mask) of (xc @ W_enc + b_enc), chunk by chunk.

  ``platform`` picks the chunk policy (None: that of the platform it is lowered for).
  """
  n, d = xc.shape
  m_local = W_enc.shape[1]
  cdt = jnp.dtype(compute_dtype)
  w = W_enc.astype(cdt)
  b = b_enc.astype(jnp.float32)

  def one_chunk(x_chunk):
    # The bias is added inside the selections (pre + b is never written on the CPU).
    pre = jnp.dot(x_chunk.astype(cdt), w, preferred_element_type=jnp.float32)
    out = tuple(local_top_k(pre, min(k, m_local), b))
    if k_aux:
      out = out + tuple(masked_top_k(pre, aux_mask, min(k_aux, m_local), b))
    return out

  def chunked(xc, platform):
    chunk = _row_chunk(n, m_local, platform)
    n_pad = -n % chunk
    xs = jnp.pad(xc, ((0, n_pad), (0, 0))).reshape(-1, chunk, d)
    outs = lax.map(one_chunk, xs)
    return tuple(o.reshape(n + n_pad, -1)[:n] for o in outs)

  if platform is not None:
    return list(chunked(xc, platform))
  return list(lax.platform_dependent(xc, cpu=lambda xc: chunked(xc, "cpu"),
                                     tpu=lambda xc: chunked(xc, "tpu"),
                                     default=lambda xc: chunked(xc, "gpu")))


def _merge_shards(vals, idx, k, m_local, axis_name):
  """Local candidates (local ids) -> the global top-k, identical on every shard."""
  idx = idx.astype(jnp.int32) + shard_offset(m_local, axis_name)
  if axis_name is None or lax.axis_size(axis_name) == 1:
    # One shard: its candidates are the answer (a merge would re-sort [N, k] for nothing; on
    # the CPU the AuxK re-sort of [4096, 256] cost 0.1 s a step).
    return vals, idx
  # Candidates from every shard in shard order: ties resolve to the lower global index, as
  # lax.top_k does on one device.
  vals = lax.all_gather(vals, axis_name, axis=1, tiled=True)
  idx = lax.all_gather(idx, axis_name, axis=1, tiled=True)
  top, pos = lax.top_k(vals, k)
  return top, jnp.take_along_axis(idx, pos, axis=1)


def _encode_fwd(x, W_enc, b_enc, b_dec, aux_mask, k, k_aux, axis_name, compute_dtype,
                kernels="xla"):
  del kernels  # the encoder matmul and top-k are XLA's either way
  xc = x.astype(jnp.float32) - b_dec.astype(jnp.float32)
  m_local = W_enc.shape[1]
  sel = _encode_select(xc, W_enc, b_enc, aux_mask, k, k_aux, compute_dtype)
  top, idx = _merge_shards(sel[0], sel[1], k, m_local, axis_name)
  values = jnp.maximum(top, 0.0)
  n = x.shape[0]
  if k_aux:
    atop, aidx = _merge_shards(sel[2], sel[3], k_aux, m_local, axis_name)
    aux_values = jnp.maximum(atop, 0.0)  # -inf (not dead) -> 0: no gradient, no contribution
  else:
    aux_values = jnp.zeros((n, 0), jnp.float32)
    aidx = jnp.zeros((n, 0), jnp.int32)
  codes = TopKCodes(values, idx, aux_values, aidx)
  return codes, (xc, W_enc, idx, aidx, values > 0, aux_values > 0)


def _encode_bwd(k, k_aux, axis_name, compute_dtype, kernels, res, g):
  del k, k_aux, compute_dtype
  xc, W_enc, idx, aidx, live, aux_live = res
  weights = jnp.concatenate([jnp.where(live, g.values, 0.0),
                             jnp.where(aux_live, g.aux_values, 0.0)], axis=1)
  indices = jnp.concatenate([idx, aidx], axis=1)
  m_local = W_enc.shape[1]
  rows, owned = owned_rows(indices, m_local, axis_name)
  weights = jnp.where(owned, weights, 0.0).astype(jnp.float32)
  # dL/dW_enc[:, m] = sum over (n, j) selecting m of weights[n, j] * xc[n]: rows of W_enc^T.
  if kernels == "xla":
    d_w_enc = row_ops.scatter_cols(rows, weights, xc, m_local, jnp.float32)
  else:
    d_w_enc = sparse_ops.scatter_rows(rows, weights, xc, m_local).T
  d_b_enc, d_b_dec = encoder_bias_grads(rows, weights, W_enc)
  # dx (unused when training, removed by XLA) needs gathers.
  d_x = row_ops.gather_sum(rows, weights, W_enc.T)
  return (d_x.astype(xc.dtype), d_w_enc.astype(W_enc.dtype), d_b_enc.astype(W_enc.dtype),
          d_b_dec.astype(W_enc.dtype), None)


def encoder_bias_grads(rows: jax.Array, weights: jax.Array, W_enc: jax.Array):
  """Gradients of b_enc [M_l] and b_dec [D] from the encoder's per-pair cotangents.

  rows: [N, J] local latent rows (M_l: not owned, dropped); weights: [N, J] d loss / d
  pre-activation. dL/dxc[n] = sum_j weights[n, j] W_enc[:, rows[n, j]], and its sum over n is
  W_enc @ d_b_enc, so b_dec's gradient (xc = x - b_dec) costs one mat-vec.
  """
  d_b_enc = jnp.zeros((W_enc.shape[1],), jnp.float32).at[rows].add(weights, mode="drop")
  return d_b_enc, -(W_enc.astype(jnp.float32) @ d_b_enc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _topk_encode(x, W_enc, b_enc, b_dec, aux_mask, k, k_aux, axis_name, compute_dtype, kernels):
  return _encode_fwd(x, W_enc, b_enc, b_dec, aux_mask, k, k_aux, axis_name, compute_dtype)[0]


_topk_encode.defvjp(_encode_fwd, _encode_bwd)


def topk_encode(x: jax.Array, W_enc: jax.Array, b_enc: jax.Array, b_dec: jax.Array, k: int, *,
                aux_mask: jax.Array | None = None, k_aux: int = 0,
                axis_name: str | None = None, compute_dtype: str = "float32",
                kernels: str = "xla") -> TopKCodes:
  """TopK encode: ReLU(top_k((x - b_dec) @ W_enc + b_enc)), with a sparse backward.

  Args:
    x: [N, D] inputs (already normalised).
    W_enc: [D, M_l]; b_enc: [M_l]; b_dec: [D].
    k: active latents per token.
    aux_mask: [M_l] bool, the latents AuxK may pick (the dead ones); needed when k_aux > 0.
    k_aux: AuxK latents per token, picked among ``aux_mask`` from the same pre-activations.
    axis_name: mesh axis the latents are sharded over (inside ``shard_map``), or None.
    compute_dtype: dtype of the matmul inputs (accumulation in float32).
    kernels: ``xla`` or ``pallas`` (the encoder weight gradient as a Pallas kernel; see
      :mod:`sae_jax.kernels.sparse_ops`).

  Returns:
    TopKCodes: values/indices [N, k], aux_values/aux_indices [N, k_aux]; indices are global.
    Gradients flow from values and aux_values to x, W_enc, b_enc and b_dec, touching only the
    N*(k + k_aux) selected (token, latent) pairs.
  """
  if k_aux and aux_mask is None:
    raise ValueError("topk_encode: k_aux > 0 needs aux_mask")
  sparse_ops.check_kernels(kernels)
  if aux_mask is None:
    aux_mask = jnp.zeros((W_enc.shape[1],), bool)
  return _topk_encode(x, W_enc, b_enc, b_dec, aux_mask, k, k_aux, axis_name, compute_dtype,
                      kernels)


# --------------------------------------------------------------------------------------------
# Sparse decode.


def _decode_fwd(values, indices, W_dec, axis_name, kernels):
  m_local = W_dec.shape[0]
  rows_idx, owned = owned_rows(indices, m_local, axis_name)
  weights = jnp.where(owned, values, 0.0).astype(jnp.float32)
  if kernels == "xla":
    out = row_ops.gather_sum(rows_idx, weights, W_dec)
  else:
    out = sparse_ops.gather_sum(jnp.minimum(rows_idx, m_local - 1), weights, W_dec)
  return out, (weights, rows_idx, owned, W_dec)


def _decode_bwd(axis_name, kernels, res, g):
  del axis_name
  weights, rows_idx, owned, W_dec = res
  m_local = W_dec.shape[0]
  g = g.astype(jnp.float32)
  d_vals = code_cotangents(rows_idx, owned, g, W_dec, kernels)
  if kernels != "xla":
    d_w = sparse_ops.scatter_rows(rows_idx, weights, g, m_local)
  else:
    d_w = row_ops.scatter_rows(rows_idx, weights, g, m_local, jnp.float32)
  return d_vals, None, d_w.astype(W_dec.dtype)


def code_cotangents(rows: jax.Array, owned: jax.Array, g: jax.Array, W_dec: jax.Array,
                    kernels: str) -> jax.Array:
  """d loss / d values [N, J] of a sparse decode: <g[n], W_dec[rows[n, j]]> where this shard
  owns the pair, else 0. rows/owned: [N, J] from :func:`owned_rows`; g: [N, D] float32."""
  if kernels == "xla":
    dots = row_ops.gather_dot(rows, g, W_dec)
  else:
    dots = sparse_ops.gather_dot(jnp.minimum(rows, W_dec.shape[0] - 1), g, W_dec)
  return jnp.where(owned, dots, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sparse_decode(values, indices, W_dec, axis_name, kernels):
  return _decode_fwd(values, indices, W_dec, axis_name, kernels)[0]


_sparse_decode.defvjp(_decode_fwd, _decode_bwd)


def sparse_decode(values: jax.Array, indices: jax.Array, W_dec: jax.Array,
                  axis_name: str | None = None, kernels: str = "xla") -> jax.Array:
  """sum_j values[n, j] * W_dec[indices[n, j]] (no bias), with a sparse backward.

  Args:
    values: [N, K] latent activations; indices: [N, K] global latent ids.
    W_dec: [M_l, D] this shard's decoder rows.
    axis_name: mesh axis the latents are sharded over; each shard adds only the rows it owns,
      so the caller sums the [N, D] result over that axis.
    kernels: ``xla`` or ``pallas`` (see :mod:`sae_jax.kernels.sparse_ops`).

  Returns:
    [N, D] float32 (partial, when sharded). Gradients go to ``values`` (owned entries) and
    ``W_dec`` (only the selected rows).
  """
  sparse_ops.check_kernels(kernels)
  return _sparse_decode(values, indices, W_dec, axis_name, kernels)


# --------------------------------------------------------------------------------------------
# Order statistics without sorting.


def kth_largest_nonneg(values: jax.Array, kth: int | jax.Array,
                       axis_name: str | None = None) -> jax.Array:
  """The kth largest of the non-negative ``values`` over all shards of ``axis_name``.

  Exact: a bisection over the int32 bit patterns (monotone for non-negative floats), each round a
  vectorised count plus one psum, so the batch never needs sorting or gathering.
  """
  bits = lax.bitcast_convert_type(jnp.maximum(values.astype(jnp.float32), 0.0), jnp.int32)

  def count_ge(t):
    c = jnp.sum(bits >= t, dtype=jnp.int32)
    return c if axis_name is None else lax.psum(c, axis_name)

  def body(_, lo_hi):
    lo, hi = lo_hi  # invariant: count_ge(lo) >= kth > count_ge(hi)
    mid = lo + (hi - lo) // 2
    ok = count_ge(mid) >= kth
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800001)))
  return lax.bitcast_convert_type(lo, jnp.float32)
