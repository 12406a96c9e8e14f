"""AuxK reconstruction by dense matmuls over the dead latents only.

AuxK (Gao et al.) lets the top ``k_aux`` dead latents of each token reconstruct the residual.
With ``k_aux = d_in / 2`` (their heuristic) the sparse path moves N * k_aux rows of W_enc and
W_dec per step (the paper's shape: 32,768 tokens x 1,024 rows of 2,048 floats, 275 GB per
pass), while the dead latents are known before the step and usually few. Gathered into a block
of ``capacity`` columns (a power of two >= the number of dead latents), the same loss is five
[N, D] x [D, capacity] matmuls: at 25 % dead, about 1.25 encoder matmuls.

Same selection as the sparse path (top k_aux of the dead latents' pre-activations, ReLU), same
gradients, to float tolerance (sums run in another order). One latent shard only: a sharded
latent axis keeps the sparse path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels.topk import local_top_k


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(a: jax.Array, b: jax.Array, cdt) -> jax.Array:
  """[N, K] x [K, L] -> [N, L] float32 from ``cdt`` inputs, its two gradient matmuls in ``cdt``
  too (autodiff would multiply the float32 cotangent by the cdt operand in float32: on a GPU
  at bfloat16 the dense AuxK's backward ran as three float32 (TF32) matmuls, 12 % of the
  paper-shape AuxK step)."""
  return jnp.dot(a.astype(cdt), b.astype(cdt), preferred_element_type=jnp.float32)


def _dot_fwd(a, b, cdt):
  return _dot(a, b, cdt), (a, b)


def _dot_bwd(cdt, res, g):
  a, b = res
  g = g.astype(cdt)
  ga = jnp.dot(g, b.astype(cdt).T, preferred_element_type=jnp.float32)
  gb = jnp.dot(a.astype(cdt).T, g, preferred_element_type=jnp.float32)
  return ga.astype(a.dtype), gb.astype(b.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dead_columns(aux_mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the dead latents, padded to ``capacity``: ([capacity] int32, [capacity] bool)."""
  m = aux_mask.shape[0]
  (cols,) = jnp.nonzero(aux_mask, size=capacity, fill_value=m)
  valid = cols < m
  return jnp.where(valid, cols, 0).astype(jnp.int32), valid


def dense_auxk_decode(x: jax.Array, W_enc: jax.Array, b_enc: jax.Array, b_dec: jax.Array,
                      W_dec: jax.Array, aux_mask: jax.Array, k_aux: int, capacity: int,
                      compute_dtype: str = "float32") -> jax.Array:
  """sum over each token's top-k_aux dead latents of ReLU(pre) * W_dec[latent].

  pre = (x - b_dec) @ W_enc + b_enc, as the sparse path computes it.

  Args:
    x: [N, D] normalised inputs (not differentiated). W_enc: [D, M]; b_enc: [M]; b_dec: [D];
      W_dec: [M, D].
    aux_mask: [M] bool, the dead latents (at most ``capacity`` of them are used).
    k_aux: latents per token (<= capacity). capacity: static column count.
    compute_dtype: matmul input dtype (accumulation in float32).

  Returns:
    [N, D] float32, differentiable in W_enc, b_enc, b_dec and W_dec by plain autodiff (every
    operation is dense or a gather of ``capacity`` columns).
  """
  if not 0 < k_aux <= capacity:
    raise ValueError(f"dense AuxK needs 0 < k_aux={k_aux} <= capacity={capacity}")
  cdt = jnp.dtype(compute_dtype)
  cols, valid = dead_columns(aux_mask, capacity)
  w_enc = jnp.take(W_enc, cols, axis=1).astype(cdt)  # [D, C]
  # (x - b_dec) @ W = x @ W - b_dec @ W: b_dec's gradient is then a mat-vec, not a third
  # [N, C] x [C, D] matmul for the gradient of (x - b_dec).
  x = lax.stop_gradient(x)
  pre = _dot(x.astype(cdt), w_enc, cdt)
  shift = jnp.dot(b_dec.astype(cdt), w_enc, preferred_element_type=jnp.float32)
  pre = pre - shift[None, :] + jnp.take(b_enc, cols).astype(jnp.float32)
  pre = jnp.where(valid[None, :], pre, -jnp.inf)  # padding is never selected
  # Select without differentiating (the CPU's fast top-k has no derivative), then gather the
  # selected pre-activations: their gradient is the same as through lax.top_k's values.
  _, pos = local_top_k(lax.stop_gradient(pre), k_aux)  # [N, k_aux]
  vals = jnp.maximum(jnp.take_along_axis(pre, pos, axis=1), 0.0)  # -inf (too few dead) -> 0
  n = x.shape[0]
  codes = jnp.zeros((n, capacity), jnp.float32).at[jnp.arange(n)[:, None], pos].set(vals)
  w_dec = jnp.take(W_dec, cols, axis=0).astype(cdt)  # [C, D]
  return _dot(codes.astype(cdt), w_dec, cdt)
