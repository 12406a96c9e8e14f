"""The TopK and the AuxK sparse decodes of a train step (one W_dec) as one op.

Apart, each decode's backward is a gather-dot and a scatter-add: four independent ops (and an
add of two [M_l, D] gradients) that XLA's CPU runtime runs concurrently, each splitting its
work over the same cores, which made the AuxK scatter 3-5x slower than alone. Here the
backward is ``rows.decode_pair_backward``: on the CPU one FFI call over the k + k_aux columns
(the dots, then one scatter of both into W_dec's gradient); elsewhere the same four ops.
Same values and gradients as two :func:`sparse_decode` calls (sums in another order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax.kernels import rows as row_ops
from sae_jax.kernels.topk import owned_rows


def _pair_fwd(values, indices, aux_values, aux_indices, W_dec, axis_name):
  m_local = W_dec.shape[0]
  rows, owned = owned_rows(jnp.concatenate([indices, aux_indices], axis=1), m_local, axis_name)
  weights = jnp.where(owned, jnp.concatenate([values, aux_values], axis=1), 0.0)
  weights = weights.astype(jnp.float32)
  k = values.shape[1]
  out = (row_ops.gather_sum(rows[:, :k], weights[:, :k], W_dec),
         row_ops.gather_sum(rows[:, k:], weights[:, k:], W_dec))
  return out, (rows, weights, W_dec)


def _pair_bwd(axis_name, k, res, g):
  del axis_name
  rows, weights, W_dec = res
  g_main, g_aux = (c.astype(jnp.float32) for c in g)
  d_weights, d_w = row_ops.decode_pair_backward(rows, weights, g_main, g_aux, W_dec, k)
  return d_weights[:, :k], None, d_weights[:, k:], None, d_w.astype(W_dec.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _decode_pair(values, indices, aux_values, aux_indices, W_dec, axis_name, k):
  del k
  return _pair_fwd(values, indices, aux_values, aux_indices, W_dec, axis_name)[0]


_decode_pair.defvjp(lambda v, i, av, ai, w, axis_name, k: _pair_fwd(v, i, av, ai, w, axis_name),
                    _pair_bwd)


def sparse_decode_pair(values: jax.Array, indices: jax.Array, aux_values: jax.Array,
                       aux_indices: jax.Array, W_dec: jax.Array,
                       axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """(sparse_decode(values, indices), sparse_decode(aux_values, aux_indices)) on one W_dec.

  Args:
    values, indices: [N, K] TopK codes (global latent ids); aux_values, aux_indices: [N, K_aux]
      the AuxK codes. W_dec: [M_l, D] this shard's decoder rows.
    axis_name: mesh axis the latents are sharded over (each shard adds the rows it owns).

  Returns:
    Two [N, D] float32 partial reconstructions. Gradients go to both values (owned entries)
    and W_dec (the sum of both decodes' row gradients).
  """
  return _decode_pair(values, indices, aux_values, aux_indices, W_dec, axis_name,
                      values.shape[1])
