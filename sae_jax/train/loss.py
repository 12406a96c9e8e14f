"""The SAE loss on one shard of a ("data", "model") mesh, and its cotangents.

Shared by the autodiff step (:mod:`sae_jax.train.step`) and the block-wise update
(:mod:`sae_jax.train.blockwise`), so both train on exactly the same objective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.saes.base import ShardCtx


class BatchStats(NamedTuple):
  """Global statistics of the (normalised) batch, read from one shard."""

  total_var: jax.Array  # sum over tokens of |x - mean|^2 (the FVU's denominator)
  dead: jax.Array  # [M_l] bool: this shard's dead latents
  num_dead: jax.Array  # int32: dead latents over all shards


def batch_stats(x: jax.Array, tsf: jax.Array, dead_tokens: int, ctx: ShardCtx) -> BatchStats:
  """x: [n, D] this shard's tokens; tsf: [M_l] tokens since each local latent fired."""
  mean = ctx.psum_data(x.sum(0)) / ctx.n_global
  total_var = jnp.maximum(ctx.psum_data(jnp.sum((x - mean) ** 2)), 1e-12)
  dead = tsf >= dead_tokens
  return BatchStats(total_var, dead, ctx.psum_model(dead.sum(dtype=jnp.int32)))


class LossTerms(NamedTuple):
  """The loss, its metrics and the cotangents of the reconstructions (all on one shard)."""

  metrics: dict  # loss, recon_loss, mse, fvu, aux_loss, penalty (global scalars)
  g_xhat: jax.Array  # [n, D] d loss / d x_hat
  g_aux: jax.Array | None  # [n, D] d loss / d (AuxK reconstruction), or None without AuxK


def loss_terms(partial_xhat, aux_partial, penalty, b_dec, x, stats: BatchStats, *,
               recon_loss: str, auxk_coef: float, k_aux_cfg: int, ctx: ShardCtx) -> LossTerms:
  """Reconstruction (+ AuxK) loss from this shard's partial reconstructions.

  Args:
    partial_xhat: [n, D] this shard's share of x_hat without b_dec (summed over "model" here).
    aux_partial: [n, D] this shard's share of the AuxK reconstruction, or None.
    penalty: this shard's share of the sparsity penalty (summed over both axes here).
    b_dec: [D]; x: [n, D] the normalised inputs; stats: from :func:`batch_stats`.
    recon_loss: "fvu" (sum of squared errors / total variance) or "mse" (/ tokens).
    k_aux_cfg: the configured AuxK width (the loss is scaled down while fewer are dead).
  """
  x_hat = ctx.psum_model(partial_xhat) + b_dec.astype(jnp.float32)
  err = x_hat - x
  sse = ctx.psum_data(jnp.sum(err ** 2))
  denom = stats.total_var if recon_loss == "fvu" else jnp.float32(ctx.n_global)
  recon = sse / denom
  penalty = ctx.psum_all(penalty)
  loss = recon + penalty
  g_aux, aux_loss = None, jnp.zeros((), jnp.float32)
  if aux_partial is not None:
    # Gao et al.: the dead latents' top-k_aux reconstruct the main residual (held fixed),
    # scaled down while fewer than k_aux latents are dead.
    aux_err = ctx.psum_model(aux_partial) + err  # e_hat - (x - x_hat)
    scale = jnp.minimum(stats.num_dead / k_aux_cfg, 1.0)
    aux_loss = scale * ctx.psum_data(jnp.sum(aux_err ** 2)) / stats.total_var
    loss = loss + auxk_coef * aux_loss
    g_aux = auxk_coef * scale * 2.0 * aux_err / stats.total_var
  metrics = {"loss": loss, "recon_loss": recon, "mse": sse / ctx.n_global,
             "fvu": sse / stats.total_var, "aux_loss": aux_loss, "penalty": penalty}
  return LossTerms(metrics, 2.0 * err / denom, g_aux)
