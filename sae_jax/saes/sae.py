"""The SAE a user holds: config + parameters + buffers, with encode / decode / reconstruct.

Inputs are raw activations in the model's own scale; the configured normalisation is applied on
the way in and undone by ``reconstruct``. Axes: N tokens, D = d_in, M = d_sae, K active.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sae_jax.config import SAEConfig
from sae_jax.errors import ConfigError, DataError
from sae_jax.kernels import sparse_decode
from sae_jax.saes import registry
from sae_jax.saes.base import normalize_inputs


@functools.partial(jax.jit, static_argnums=(0,))
def _normalize(cfg: SAEConfig, buffers, x):
  return normalize_inputs(x, cfg.normalize, buffers["norm_scale"])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode_sparse(cfg, params, buffers, x, k):
  xn, _ = normalize_inputs(x, cfg.normalize, buffers["norm_scale"])
  return registry.get(cfg.architecture).encode_sparse(params, buffers, xn, cfg, k)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_dense(cfg, params, buffers, x):
  xn, _ = normalize_inputs(x, cfg.normalize, buffers["norm_scale"])
  return registry.get(cfg.architecture).encode_dense(params, buffers, xn, cfg)


def reconstruct_rows(cfg: SAEConfig, params, buffers, x: jax.Array) -> jax.Array:
  """[N, D] raw activations -> their reconstruction [N, D] in the model's own scale (a pure
  function of the weights: usable inside another jitted function, e.g. a model splice)."""
  _, scale = _normalize(cfg, buffers, x)
  acts = _encode_dense(cfg, params, buffers, x)
  x_hat = jnp.asarray(acts, jnp.float32) @ params["W_dec"].astype(jnp.float32) + params["b_dec"]
  return x_hat / scale


@jax.jit
def _decode_sparse(params, values, indices):
  return sparse_decode(values.astype(jnp.float32), indices, params["W_dec"]) + params["b_dec"]


# File writers by format name ("sae_jax", "sae_lens", ...), filled in by sae_jax.formats when
# it is imported (importing sae_jax does), so this module needs nothing of the file formats.
WRITERS: dict[str, Callable[["SAE", str], None]] = {}


def _writer(format: str):
  if format not in WRITERS:
    raise ConfigError(f"unknown export format {format!r}; allowed: {list(WRITERS)}")
  return WRITERS[format]


@dataclasses.dataclass
class SAE:
  """A trained (or freshly initialised) sparse autoencoder.

  Attributes:
    cfg: the SAEConfig. params: W_enc [D, M], b_enc [M], W_dec [M, D], b_dec [D] (+
      log_threshold [M] for jumprelu). buffers: norm_scale (expected_norm factor), threshold
      (batchtopk's inference threshold). metadata: provenance (model, hook, tokens seen, ...).
  """

  cfg: SAEConfig
  params: dict[str, jax.Array]
  buffers: dict[str, jax.Array]
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    registry.check(self.cfg)  # an SAE its architecture cannot run fails here, in one line

  @property
  def architecture(self):
    return registry.get(self.cfg.architecture)

  def _check(self, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
      raise DataError(f"input has shape {tuple(x.shape)}; the SAE expects [..., {self.cfg.d_in}]")
    return x.reshape(-1, self.cfg.d_in)

  def encode(self, x, k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """[..., D] activations -> (values, indices), each [..., k]; k defaults to cfg.k."""
    k = self.cfg.k if k is None else k
    if k is None:
      raise DataError(f"{self.cfg.architecture} SAE has no k; pass encode(x, k=...) or use "
                      "encode_dense")
    lead = jnp.shape(x)[:-1]
    vals, idx = _encode_sparse(self.cfg, self.params, self.buffers, self._check(x), k)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)

  def encode_dense(self, x) -> jax.Array:
    """[..., D] -> [..., M] latent activations."""
    lead = jnp.shape(x)[:-1]
    acts = _encode_dense(self.cfg, self.params, self.buffers, self._check(x))
    return acts.reshape(*lead, self.cfg.d_sae)

  def decode(self, values, indices) -> jax.Array:
    """Sparse codes [..., K] -> [..., D] in the normalised space (b_dec included)."""
    lead = jnp.shape(values)[:-1]
    out = _decode_sparse(self.params, jnp.reshape(values, (-1, jnp.shape(values)[-1])),
                         jnp.reshape(indices, (-1, jnp.shape(indices)[-1])))
    return out.reshape(*lead, self.cfg.d_in)

  def decode_dense(self, acts) -> jax.Array:
    """[..., M] latent activations -> [..., D] in the normalised space."""
    acts = jnp.asarray(acts, jnp.float32)
    return acts @ self.params["W_dec"].astype(jnp.float32) + self.params["b_dec"]

  def save(self, path) -> None:
    """Write this SAE to the directory ``path`` (cfg.json + sae.safetensors), atomically."""
    _writer("sae_jax")(self, path)

  def export(self, path, format: str = "sae_lens") -> None:
    """Write this SAE for another tool: ``sae_lens``, ``sparsify`` or ``llm_jp_sae``."""
    _writer(format)(self, path)

  def reconstruct(self, x) -> jax.Array:
    """[..., D] activations -> their reconstruction in the model's own scale."""
    lead = jnp.shape(x)[:-1]
    x_hat = reconstruct_rows(self.cfg, self.params, self.buffers, self._check(x))
    return x_hat.reshape(*lead, self.cfg.d_in)
