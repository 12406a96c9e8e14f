"""BatchTopK SAE (Bussmann et al. 2024): keep the k*N largest activations of the whole batch.

Training: each token first keeps its ``cap * k`` (option ``cap``) largest latents (sparse kernels),
then one threshold over the global batch (an exact bisection, no sort) keeps the k*N largest.
Exact whenever no token holds more than cap*k of the batch's top k*N activations; the cap is
configurable. Inference: a learned global threshold (a running mean of the batch threshold)
makes the encoder a per-token JumpReLU with one shared threshold.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from sae_jax.errors import ConfigError
from sae_jax.kernels import kth_largest_nonneg
from sae_jax.saes.registry import register
from sae_jax.saes.topk import TopK

THRESHOLD_EMA = 0.99


@dataclasses.dataclass(frozen=True)
class BatchTopKOptions:
  """cap: at train time each token keeps at most ``cap * k`` latents before the batch-wide
  threshold (exact whenever no token holds more of the batch's top k*N)."""

  cap: int = 4

  def __post_init__(self):
    if not (isinstance(self.cap, int) and self.cap >= 1):
      raise ConfigError(f"batchtopk cap={self.cap!r} must be an int >= 1")


@register
class BatchTopK(TopK):
  name = "batchtopk"
  Options = BatchTopKOptions

  def encode_dense(self, params, buffers, x, cfg):
    pre = self.pre_acts(params, x, cfg)
    return jnp.where(pre > buffers["threshold"], jnp.maximum(pre, 0.0), 0.0)

  def encode_sparse(self, params, buffers, x, cfg, k):
    vals, idx = lax.top_k(self.pre_acts(params, x, cfg), k)
    vals = jnp.where(vals > buffers["threshold"], jnp.maximum(vals, 0.0), 0.0)
    return vals, idx.astype(jnp.int32)

  def train_forward(self, params, buffers, x, dead, cfg, tcfg, ctx, k_aux):
    cap = min(self.options(cfg).cap * cfg.k, cfg.d_sae)
    codes = self.sparse_codes(params, x, dead, cfg, ctx, cap, k_aux)
    # Values are identical on every latent shard, so the batch order statistic runs over
    # the data axis only.
    thr = kth_largest_nonneg(lax.stop_gradient(codes.values), cfg.k * ctx.n_global,
                             ctx.data_axis)
    keep = (codes.values >= thr) & (codes.values > 0)
    values = jnp.where(keep, codes.values, 0.0)
    return self._decode(params, codes, values, ctx, k_aux, thr, x, dead, cfg)

  def update_buffers(self, buffers, info, step):
    old = buffers["threshold"]
    new = jnp.where(step == 0, info.threshold,
                    THRESHOLD_EMA * old + (1 - THRESHOLD_EMA) * info.threshold)
    return {**buffers, "threshold": new}
