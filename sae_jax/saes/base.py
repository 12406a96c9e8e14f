"""What every SAE architecture shares: parameters, initialisation, normalisation, shard context.

Parameters follow the row-vector convention (SAELens): W_enc [D, M], b_enc [M], W_dec [M, D],
b_dec [D]. Axes: N tokens, D = d_in, M = d_sae (M_l: latents on this shard), K active latents.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError
from sae_jax.kernels import owned_rows

Params = dict[str, jax.Array]

PARAM_AXES: dict[str, tuple[str, ...]] = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
    "log_threshold": ("latent",),
}


@dataclasses.dataclass(frozen=True)
class ShardCtx:
  """Where a train-step body runs: the mesh axes it may reduce over and the global sizes.

  Inside ``shard_map`` the axes are names; on one device without a mesh they are None and the
  reductions are identities.
  """

  data_axis: str | None
  model_axis: str | None
  n_global: int
  # > 0: compute AuxK densely over this many dead-latent columns (kernels/auxk.py); 0: sparse.
  aux_capacity: int = 0
  kernels: str = "xla"  # TrainConfig.kernels: the sparse kernels' implementation

  def psum_data(self, x):
    return _psum(x, self.data_axis)

  def psum_model(self, x):
    return _psum(x, self.model_axis)

  def psum_all(self, x):
    return self.psum_model(self.psum_data(x))


def _psum(x, axis: str | None):
  # A psum over one shard is the identity, but XLA keeps it as an all-reduce that copies its
  # operands (the gradients: 32 MB a step at d_in 512, 8192 latents).
  if axis is None or lax.axis_size(axis) == 1:
    return x
  return lax.psum(x, axis)


class TrainForward(NamedTuple):
  """What an architecture's differentiable train forward returns on one shard.

  partial_xhat: [n, D] this shard's share of the reconstruction, without b_dec (summed over the
    model axis by the step). penalty: scalar, this shard's share of the sparsity penalty (summed
    over both axes). aux_partial: [n, D] AuxK reconstruction of the residual, or None.
  """

  partial_xhat: jax.Array
  penalty: jax.Array
  aux_partial: jax.Array | None


class TrainInfo(NamedTuple):
  """Non-differentiable by-products of a train forward, on one shard.

  fired: [M_l] how many local tokens activated each local latent (its sum over both mesh axes,
  divided by N, is the L0). threshold: batchtopk's batch threshold this step (else 0).
  """

  fired: jax.Array
  threshold: jax.Array


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """An architecture without settings of its own."""


class Architecture(abc.ABC):
  """Base class: one subclass per architecture file, registered by ``name``.

  ``Options``: a frozen dataclass of the architecture's own settings (``SAEConfig.options``),
  validated in its ``__post_init__``; :meth:`options` builds it from a config.
  """

  name: ClassVar[str]
  Options: ClassVar[type] = NoOptions
  needs_k: ClassVar[bool] = True
  sparse: ClassVar[bool] = True  # encodes through the top-k kernels; supports AuxK
  normalize_decoder: ClassVar[bool] = True  # unit-norm decoder rows, parallel grads removed
  recon_loss: ClassVar[str] = "fvu"  # "fvu" (sum sq err / total variance) or "mse"
  extra_params: ClassVar[tuple[str, ...]] = ()

  # ---- configuration -----------------------------------------------------------------------

  def options(self, cfg: SAEConfig):
    """``cfg.options`` as this architecture's Options (defaults for unset names)."""
    allowed = [f.name for f in dataclasses.fields(self.Options)]
    given = cfg.option_dict()
    unknown = sorted(set(given) - set(allowed))
    if unknown:
      raise ConfigError(f"unknown {self.name} option(s) {unknown}; allowed: {allowed}")
    return self.Options(**given)

  def validate(self, cfg: SAEConfig) -> None:
    """Raise ConfigError if ``cfg`` does not fit this architecture."""
    if self.needs_k and cfg.k is None:
      raise ConfigError(f"architecture {self.name!r} needs k (active latents per token); got "
                        f"k=None for d_sae={cfg.d_sae}")
    if cfg.k is not None and cfg.k > cfg.d_sae:
      raise ConfigError(f"k={cfg.k} must be <= d_sae={cfg.d_sae} (the SAE's latents)")
    self.options(cfg)

  # ---- parameters ------------------------------------------------------------------------

  def param_names(self) -> tuple[str, ...]:
    return ("W_enc", "b_enc", "W_dec", "b_dec") + self.extra_params

  def param_axes(self) -> dict[str, tuple[str, ...]]:
    return {n: PARAM_AXES[n] for n in self.param_names()}

  def buffer_axes(self) -> dict[str, tuple[str, ...]]:
    return {"norm_scale": (), "threshold": ()}

  def decoder_row_norm(self) -> float:
    return 1.0

  def init_params(self, key: jax.Array, cfg: SAEConfig, encoder_init: str = "tied") -> Params:
    """Zero biases and, by ``encoder_init``: ``tied``: decoder rows random directions at
    ``decoder_row_norm``, W_enc = W_dec^T; ``linear``: W_enc [D, M] uniform in
    +-1/sqrt(D) (a default linear layer, as the paper and sparsify), decoder rows its columns
    scaled to ``decoder_row_norm``.

    b_dec is set to the geometric median of the first batch by the trainer.
    """
    dtype = jnp.dtype(cfg.param_dtype)
    if encoder_init == "linear":
      bound = 1.0 / jnp.sqrt(jnp.float32(cfg.d_in))
      enc = jax.random.uniform(key, (cfg.d_sae, cfg.d_in), jnp.float32, -bound, bound)
      w = enc / jnp.linalg.norm(enc, axis=-1, keepdims=True) * self.decoder_row_norm()
    else:
      w = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
      w = w / jnp.linalg.norm(w, axis=-1, keepdims=True) * self.decoder_row_norm()
      enc = w
    params = {
        "W_enc": enc.T.astype(dtype),
        "b_enc": jnp.zeros((cfg.d_sae,), dtype),
        "W_dec": w.astype(dtype),
        "b_dec": jnp.zeros((cfg.d_in,), dtype),
    }
    params.update(self.init_extra_params(cfg))
    return params

  def init_extra_params(self, cfg: SAEConfig) -> Params:
    return {}

  def init_buffers(self, cfg: SAEConfig) -> dict[str, jax.Array]:
    return {"norm_scale": jnp.ones((), jnp.float32), "threshold": jnp.zeros((), jnp.float32)}

  # ---- inference (unsharded) ---------------------------------------------------------------

  def pre_acts(self, params: Params, x: jax.Array, cfg: SAEConfig) -> jax.Array:
    """[N, D] normalised inputs -> [N, M] float32 pre-activations."""
    cdt = jnp.dtype(cfg.compute_dtype)
    xc = x.astype(jnp.float32) - params["b_dec"].astype(jnp.float32)
    pre = jnp.dot(xc.astype(cdt), params["W_enc"].astype(cdt), preferred_element_type=jnp.float32)
    return pre + params["b_enc"].astype(jnp.float32)

  @abc.abstractmethod
  def encode_dense(self, params: Params, buffers, x: jax.Array, cfg: SAEConfig) -> jax.Array:
    """[N, D] normalised inputs -> [N, M] latent activations."""

  def encode_sparse(self, params: Params, buffers, x: jax.Array, cfg: SAEConfig, k: int
                    ) -> tuple[jax.Array, jax.Array]:
    """[N, D] -> the k largest activations and their latent ids, [N, k] each.

    Exact for every architecture: the architecture's activations, then the k largest of them
    (entries that are zero are returned with value 0).
    """
    vals, idx = lax.top_k(self.encode_dense(params, buffers, x, cfg), k)
    return vals, idx.astype(jnp.int32)

  # ---- training (one shard, inside shard_map) ----------------------------------------------

  @abc.abstractmethod
  def train_forward(self, params: Params, buffers, x: jax.Array, dead: jax.Array,
                    cfg: SAEConfig, tcfg: TrainConfig, ctx: ShardCtx, k_aux: int
                    ) -> tuple[TrainForward, TrainInfo]:
    """Differentiable forward on one shard. x: [n, D] normalised local tokens; dead: [M_l]."""

  def update_buffers(self, buffers, info: TrainInfo, step: jax.Array):
    return buffers


def geometric_median(x: jax.Array, iters: int = 50, eps: float = 1e-8) -> jax.Array:
  """Weiszfeld's algorithm: the point minimising the summed L2 distance to the rows of x [N, D]."""
  x = x.astype(jnp.float32)

  def body(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
    return (w[:, None] * x).sum(0) / w.sum()

  return lax.fori_loop(0, iters, body, x.mean(0))


def normalize_inputs(x: jax.Array, mode: str, norm_scale: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """[N, D] raw activations -> (normalised [N, D] float32, per-token factor [N, 1] applied).

  Divide a reconstruction by the factor to return to the model's own scale.
  """
  x = x.astype(jnp.float32)
  if mode == "unit_norm":
    scale = 1.0 / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  elif mode == "expected_norm":
    scale = jnp.broadcast_to(norm_scale, (x.shape[0], 1)).astype(jnp.float32)
  else:
    scale = jnp.ones((x.shape[0], 1), jnp.float32)
  return x * scale, scale


def expected_norm_scale(x: jax.Array) -> jax.Array:
  """Factor that gives the rows of x [N, D] an average L2 norm of sqrt(D)."""
  mean_norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1).mean()
  return jnp.sqrt(jnp.float32(x.shape[-1])) / jnp.maximum(mean_norm, 1e-12)


def fired_counts(indices: jax.Array, values: jax.Array, m_local: int,
                 axis_name: str | None) -> jax.Array:
  """[M_l] int32: how many tokens activate each local latent, from global top-k codes [N, K]."""
  rows, _ = owned_rows(indices, m_local, axis_name)
  rows = jnp.where(values > 0, rows, m_local)  # m_local: dropped
  return jnp.zeros((m_local,), jnp.int32).at[rows.reshape(-1)].add(1, mode="drop")

