"""ReLU SAE with an L1 penalty on activations times decoder row norms (Anthropic, 2024).

Decoder rows are not constrained (the penalty weights each activation by its row's norm, so
the scale cannot be gamed); they start at norm 0.1 with W_enc = W_dec^T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae_jax.errors import ConfigError
from sae_jax.saes.base import Architecture, TrainForward, TrainInfo
from sae_jax.saes.registry import register


@dataclasses.dataclass(frozen=True)
class ReLUOptions:
  """l1_coefficient: weight of the L1 penalty on activations times decoder row norms."""

  l1_coefficient: float = 5.0

  def __post_init__(self):
    if not self.l1_coefficient >= 0:
      raise ConfigError(f"relu l1_coefficient={self.l1_coefficient} must be >= 0")


@register
class ReLU(Architecture):
  name = "relu"
  Options = ReLUOptions
  needs_k = False
  sparse = False
  normalize_decoder = False
  recon_loss = "mse"

  def decoder_row_norm(self) -> float:
    return 0.1

  def encode_dense(self, params, buffers, x, cfg):
    return jnp.maximum(self.pre_acts(params, x, cfg), 0.0)

  def train_forward(self, params, buffers, x, dead, cfg, tcfg, ctx, k_aux):
    acts = jnp.maximum(self.pre_acts(params, x, cfg), 0.0)  # [n, M_l]
    cdt = jnp.dtype(cfg.compute_dtype)
    W_dec = params["W_dec"]
    partial = jnp.dot(acts.astype(cdt), W_dec.astype(cdt), preferred_element_type=jnp.float32)
    row_norm = jnp.linalg.norm(W_dec.astype(jnp.float32), axis=-1)
    penalty = self.options(cfg).l1_coefficient * jnp.sum(acts * row_norm) / ctx.n_global
    fired = jax.lax.stop_gradient((acts > 0).sum(0, dtype=jnp.int32))
    return (TrainForward(partial, penalty, None),
            TrainInfo(fired=fired, threshold=jnp.zeros((), jnp.float32)))
