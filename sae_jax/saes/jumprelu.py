"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): z * H(z - theta), L0 penalty.

The threshold theta = exp(log_threshold) per latent is trained through straight-through
estimators: the Heaviside step gets the pseudo-derivative -(1/eps) * rect((z - theta) / eps)
with respect to theta (eps = option ``bandwidth``), and none with respect to z.
Dense architecture: the reconstruction uses the full [N, M_l] activations of each shard.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sae_jax.errors import ConfigError
from sae_jax.saes.base import Architecture, TrainForward, TrainInfo
from sae_jax.saes.registry import register


def _rect(u):
  return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, bandwidth):
  """z * H(z - theta); d/dtheta = -(theta / eps) * rect((z - theta) / eps)."""
  return z * (z > theta)


def _jumprelu_fwd(z, theta, bandwidth):
  return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
  z, theta = res
  d_z = g * (z > theta)
  d_theta = g * (-(theta / bandwidth) * _rect((z - theta) / bandwidth))
  return d_z, d_theta.reshape(-1, theta.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, theta, bandwidth):
  """H(z - theta); d/dtheta = -(1 / eps) * rect((z - theta) / eps), no gradient to z."""
  return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, bandwidth):
  return heaviside(z, theta, bandwidth), (z, theta)


def _heaviside_bwd(bandwidth, res, g):
  z, theta = res
  d_theta = g * (-(1.0 / bandwidth) * _rect((z - theta) / bandwidth))
  return jnp.zeros_like(z), d_theta.reshape(-1, theta.shape[-1]).sum(0)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


@dataclasses.dataclass(frozen=True)
class JumpReLUOptions:
  """init_threshold: initial threshold; bandwidth: width of the straight-through rectangle
  kernel for threshold gradients; l0_coefficient: weight of the L0 penalty."""

  init_threshold: float = 0.001
  bandwidth: float = 0.001
  l0_coefficient: float = 1e-3

  def __post_init__(self):
    for name in ("init_threshold", "bandwidth"):
      if not getattr(self, name) > 0:
        raise ConfigError(f"jumprelu {name}={getattr(self, name)} must be > 0")
    if not self.l0_coefficient >= 0:
      raise ConfigError(f"jumprelu l0_coefficient={self.l0_coefficient} must be >= 0")


@register
class JumpReLU(Architecture):
  name = "jumprelu"
  Options = JumpReLUOptions
  needs_k = False
  sparse = False
  recon_loss = "mse"
  extra_params = ("log_threshold",)

  def init_extra_params(self, cfg):
    init = jnp.log(jnp.float32(self.options(cfg).init_threshold))
    return {"log_threshold": jnp.full((cfg.d_sae,), init, jnp.dtype(cfg.param_dtype))}

  def encode_dense(self, params, buffers, x, cfg):
    pre = self.pre_acts(params, x, cfg)
    theta = jnp.exp(params["log_threshold"].astype(jnp.float32))
    return pre * (pre > theta)

  def train_forward(self, params, buffers, x, dead, cfg, tcfg, ctx, k_aux):
    pre = self.pre_acts(params, x, cfg)  # [n, M_l]: this shard's latents only
    theta = jnp.exp(params["log_threshold"].astype(jnp.float32))
    opts = self.options(cfg)
    acts = jumprelu(pre, theta, opts.bandwidth)
    cdt = jnp.dtype(cfg.compute_dtype)
    partial = jnp.dot(acts.astype(cdt), params["W_dec"].astype(cdt),
                      preferred_element_type=jnp.float32)
    l0 = heaviside(pre, theta, opts.bandwidth).sum()
    penalty = opts.l0_coefficient * l0 / ctx.n_global
    fired = jax.lax.stop_gradient((pre > theta).sum(0, dtype=jnp.int32))
    return (TrainForward(partial, penalty, None),
            TrainInfo(fired=fired, threshold=jnp.zeros((), jnp.float32)))
