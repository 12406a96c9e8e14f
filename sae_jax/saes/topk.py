"""TopK SAE (Gao et al. 2024; the paper's): ReLU, then keep the k largest latents per token.

Trained through the fused sparse kernels: forward and backward touch only the N*k selected
(token, latent) pairs after the dense encoder matmul. AuxK (the top ``k_aux`` dead latents
reconstruct the residual) trains W_enc through the same sparse path.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sae_jax.kernels import select_topk, sparse_decode, topk_encode
from sae_jax.kernels.auxk import dense_auxk_decode
from sae_jax.kernels.decode_pair import sparse_decode_pair
from sae_jax.saes.base import Architecture, TrainForward, TrainInfo, fired_counts
from sae_jax.saes.registry import register


@register
class TopK(Architecture):
  name = "topk"

  def encode_dense(self, params, buffers, x, cfg):
    vals, idx = self.encode_sparse(params, buffers, x, cfg, cfg.k)
    dense = jnp.zeros((x.shape[0], cfg.d_sae), jnp.float32)
    return dense.at[jnp.arange(x.shape[0])[:, None], idx].set(vals)

  def encode_sparse(self, params, buffers, x, cfg, k):
    if k > cfg.k:
      return super().encode_sparse(params, buffers, x, cfg, k)
    top, idx = select_topk(self.pre_acts(params, x, cfg), cfg.k)
    return jnp.maximum(top[:, :k], 0.0), idx[:, :k]

  def sparse_codes(self, params, x, dead, cfg, ctx, k, k_aux):
    """Top-k codes, with the AuxK ones unless AuxK runs densely (ctx.aux_capacity)."""
    return topk_encode(x, params["W_enc"], params["b_enc"], params["b_dec"], k,
                       aux_mask=dead, k_aux=0 if ctx.aux_capacity else k_aux,
                       axis_name=ctx.model_axis, compute_dtype=cfg.compute_dtype,
                       kernels=ctx.kernels)

  def train_forward(self, params, buffers, x, dead, cfg, tcfg, ctx, k_aux):
    codes = self.sparse_codes(params, x, dead, cfg, ctx, cfg.k, k_aux)
    return self._decode(params, codes, codes.values, ctx, k_aux, jnp.zeros((), jnp.float32),
                        x, dead, cfg)

  def _decode(self, params, codes, values, ctx, k_aux, threshold, x, dead, cfg):
    W_dec = params["W_dec"]
    sparse_aux = bool(k_aux) and not ctx.aux_capacity
    if sparse_aux and ctx.kernels == "xla":
      # One op for both decodes: its backward is one pass on the CPU (kernels/decode_pair.py).
      partial, aux = sparse_decode_pair(values, codes.indices, codes.aux_values,
                                        codes.aux_indices, W_dec, ctx.model_axis)
    else:
      partial = sparse_decode(values, codes.indices, W_dec, ctx.model_axis, ctx.kernels)
      aux = None
      if sparse_aux:
        aux = sparse_decode(codes.aux_values, codes.aux_indices, W_dec, ctx.model_axis,
                            ctx.kernels)
      elif k_aux:
        aux = dense_auxk_decode(x, params["W_enc"], params["b_enc"], params["b_dec"], W_dec,
                                dead, k_aux, ctx.aux_capacity, cfg.compute_dtype)
    m_local = W_dec.shape[0]
    fired = fired_counts(codes.indices, lax.stop_gradient(values), m_local, ctx.model_axis)
    return (TrainForward(partial, jnp.zeros((), jnp.float32), aux),
            TrainInfo(fired=fired, threshold=threshold))
