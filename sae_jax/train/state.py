"""The SAE train state, its optimizer and its placement on a mesh.

State is built abstractly first (``jax.eval_shape``), its shardings derived from the logical
axes of each leaf, then initialised straight into place with ``jax.jit(out_shardings=...)``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_jax import sharding
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError, DataError
from sae_jax.kernels.topk import sparse_decode
from sae_jax.sharding import Axes
from sae_jax.saes import registry
from sae_jax.saes.base import expected_norm_scale, geometric_median, normalize_inputs

# tokens_since_fired saturates here so int32 never overflows on long runs.
TOKENS_SINCE_FIRED_CAP = 2**30


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (and a checkpoint must hold).

  step: optimizer steps taken. params: SAE parameters. opt_state: optax state. buffers:
  non-trained SAE state (normalisation factor, batchtopk threshold). tokens_since_fired: [M]
  int32, for dead-latent detection. nan_batches: non-finite batches skipped so far.
  """

  step: jax.Array
  params: dict[str, jax.Array]
  opt_state: Any
  buffers: dict[str, jax.Array]
  tokens_since_fired: jax.Array
  nan_batches: jax.Array


def make_optimizer(sae_cfg: SAEConfig, tcfg: TrainConfig) -> optax.GradientTransformation:
  """Adam with linear warm-up then constant or cosine decay (eps 6.25e-10 by default)."""
  opt = tcfg.optim
  lr = opt.learning_rate(sae_cfg.d_sae)
  warmup = max(opt.warmup_steps, 1)
  if opt.lr_schedule == "cosine":
    if tcfg.total_tokens is None:
      raise ConfigError("lr_schedule='cosine' needs total_tokens; set it or use 'constant'")
    total = max(tcfg.total_tokens // tcfg.batch_size, warmup + 1)

    def decay(count):
      t = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
      cos = 0.5 * (1 + jnp.cos(jnp.pi * t))
      return opt.lr_end_ratio + (1 - opt.lr_end_ratio) * cos
  else:
    def decay(count):
      return 1.0

  def schedule(count):
    # (count + 1): the very first step already moves (a zero-lr step would waste a batch).
    return lr * jnp.minimum(1.0, (count + 1) / warmup) * decay(count)

  return optax.adam(schedule, b1=opt.adam_b1, b2=opt.adam_b2, eps=opt.adam_eps)


def long_warmup_message(tcfg: TrainConfig, total_steps: int | None) -> str | None:
  """Why the warm-up is suspicious (it covers more than half of the run's steps), or None."""
  warmup = tcfg.optim.warmup_steps
  if not total_steps or 2 * warmup <= total_steps:
    return None
  return (f"the learning-rate warm-up ({warmup} steps) covers more than half of the run's "
          f"{total_steps} steps: the SAE trains at a small learning rate for most of the run "
          f"(the final lr is {min(1.0, total_steps / max(warmup, 1)):.0%} of the set lr); "
          f"lower optim.warmup_steps or train on more tokens")


def state_axes(sae_cfg: SAEConfig, abstract_state: TrainState) -> TrainState:
  """Logical axes of every leaf of a TrainState (optimizer moments follow their parameter)."""
  arch = registry.get(sae_cfg.architecture)
  p_axes = {k: Axes(v) for k, v in arch.param_axes().items()}

  def opt_leaf_axes(path, leaf):
    for entry in reversed(path):
      key = getattr(entry, "key", None)
      if key in p_axes and len(p_axes[key]) == leaf.ndim:
        return p_axes[key]
    return Axes((None,) * leaf.ndim)

  opt_axes = jax.tree_util.tree_map_with_path(opt_leaf_axes, abstract_state.opt_state)
  b_axes = {k: Axes(arch.buffer_axes()[k]) for k in abstract_state.buffers}
  return TrainState(step=Axes(), params=p_axes, opt_state=opt_axes, buffers=b_axes,
                    tokens_since_fired=Axes(("latent",)), nan_batches=Axes())


def state_shardings(sae_cfg: SAEConfig, tcfg: TrainConfig, mesh: Mesh) -> TrainState:
  """NamedSharding for every leaf of the TrainState on ``mesh``."""
  abstract = jax.eval_shape(lambda: _init_state(sae_cfg, tcfg, None, jax.random.key(0)))
  return sharding.tree_shardings(state_axes(sae_cfg, abstract), mesh)


# Encoder inits that start from the linear draw and scale W_enc to fit the first batch (TopK).
FITTED_INITS = ("linear_fit", "data")
# "data" scales W_enc by c ** DATA_FIT_POWER, c the first batch's fitted scale: the whole fit
# (power 1) removes the k-fold overshoot of aligned latents on correlated tokens, but an
# encoder that starts small against Adam's fixed step size loses latents from the top-k early
# (dead for good); three quarters of the way from the draw to the fit (in log scale) kept
# fewer dead latents than sparsify on every benchmark dataset (quality_note.md, round 9).
DATA_FIT_POWER = 0.75


def resolve_encoder_init(encoder_init: str, architecture: str) -> str:
  """``auto`` -> ``data`` for TopK SAEs (it learns fastest: quality_note.md), else ``linear``."""
  if encoder_init != "auto":
    return encoder_init
  return "data" if architecture == "topk" else "linear"


def _init_state(sae_cfg, tcfg, first_batch, key, init_params=None) -> TrainState:
  arch = registry.get(sae_cfg.architecture)
  init = resolve_encoder_init(tcfg.encoder_init, sae_cfg.architecture)
  fit = init in FITTED_INITS
  params = arch.init_params(key, sae_cfg, "linear" if fit else init)
  warm = init_params is not None
  if warm:  # warm start: another SAE's parameters (same shapes), fresh optimizer and counters
    params = {k: jnp.asarray(init_params[k], v.dtype) for k, v in params.items()}
  buffers = arch.init_buffers(sae_cfg)
  if first_batch is not None:
    if sae_cfg.normalize == "expected_norm":
      buffers["norm_scale"] = expected_norm_scale(first_batch)
    if not warm:
      x, _ = normalize_inputs(first_batch, sae_cfg.normalize, buffers["norm_scale"])
      b_dec = geometric_median(x, tcfg.geometric_median_iters)
      params["b_dec"] = b_dec.astype(params["b_dec"].dtype)
      if init == "data":
        params = data_directions(params, x, jax.random.fold_in(key, 1), arch.decoder_row_norm())
      if fit:  # "data" too: on correlated tokens the k aligned latents overshoot ~k-fold
        c = fitted_encoder_scale(arch, params, buffers, x, sae_cfg)
        c = c ** DATA_FIT_POWER if init == "data" else c
        params["W_enc"] = (params["W_enc"].astype(jnp.float32) * c).astype(params["W_enc"].dtype)
  opt_state = make_optimizer(sae_cfg, tcfg).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    buffers=buffers, tokens_since_fired=jnp.zeros((sae_cfg.d_sae,), jnp.int32),
                    nan_batches=jnp.zeros((), jnp.int32))


def fitted_encoder_scale(arch, params, buffers, x: jax.Array, cfg: SAEConfig,
                         chunk: int = 256) -> jax.Array:
  """The scalar c minimising ||x - b_dec - c r(x)||^2 over x [N, D], r the TopK reconstruction
  (less b_dec) at the current W_enc: c = <x - b_dec, r> / <r, r>.

  With b_enc = 0 the top-k selection is the same at c W_enc for every c > 0 (ReLU, then top-k)
  and the reconstruction is c r(x), so W_enc <- c W_enc gives the lowest first-batch error for
  the drawn directions. Chunks of ``chunk`` tokens bound the [chunk, M] pre-activations; the
  padding rows are b_dec (no pre-activation, so they add nothing to either sum).
  """
  b_dec = params["b_dec"].astype(jnp.float32)
  n = x.shape[0]
  pad = -n % chunk
  xs = jnp.concatenate([x.astype(jnp.float32), jnp.broadcast_to(b_dec, (pad, x.shape[1]))])
  w_dec = params["W_dec"].astype(jnp.float32)

  def sums(xb):
    vals, idx = arch.encode_sparse(params, buffers, xb, cfg, cfg.k)
    r = sparse_decode(vals, idx, w_dec)
    return jnp.stack([jnp.sum((xb - b_dec) * r), jnp.sum(r * r)])

  num, den = jnp.sum(lax.map(sums, xs.reshape(-1, chunk, x.shape[1])), axis=0)
  # No latent fired (r = 0) or no positive fit (a negative c would change the selection):
  # keep the drawn scale.
  ok = (den > 0) & (num > 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)


def data_directions(params, x: jax.Array, key: jax.Array, row_norm: float = 1.0) -> dict:
  """Latents 0..m-1 (m = min(N, M)) along m distinct tokens of x [N, D] less b_dec: W_dec rows
  the unit directions times ``row_norm``, W_enc [D, M] columns the same directions at the drawn
  columns' norms (the linear init's magnitude, which learned best in quality_note.md). The other
  latents, and any token at b_dec (no direction), keep the drawn weights."""
  w_enc, w_dec = params["W_enc"], params["W_dec"]
  m = min(x.shape[0], w_dec.shape[0])
  xc = x[jax.random.permutation(key, x.shape[0])[:m]].astype(jnp.float32)
  xc = xc - params["b_dec"].astype(jnp.float32)
  norm = jnp.linalg.norm(xc, axis=1, keepdims=True)
  ok = norm > 0
  u = xc / jnp.where(ok, norm, 1.0)
  enc, dec = w_enc[:, :m].astype(jnp.float32), w_dec[:m].astype(jnp.float32)
  enc = jnp.where(ok.T, u.T * jnp.linalg.norm(enc, axis=0, keepdims=True), enc)
  dec = jnp.where(ok, u * row_norm, dec)
  return {**params, "W_enc": w_enc.at[:, :m].set(enc.astype(w_enc.dtype)),
          "W_dec": w_dec.at[:m].set(dec.astype(w_dec.dtype))}


def check_batch(x, d_in: int, what: str = "activations") -> None:
  """Raise a DataError unless x is a floating [n, d_in] array."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 2:
    raise DataError(f"{what} must be a 2-D [tokens, d_in] array; got shape {shape}")
  if shape[1] != d_in:
    raise DataError(f"{what} have width {shape[1]} but the SAE has d_in={d_in}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise DataError(f"{what} dtype {x.dtype} is not floating point")


def init_train_state(sae_cfg: SAEConfig, tcfg: TrainConfig, mesh: Mesh, first_batch,
                     key: jax.Array | None = None, init_params: dict | None = None
                     ) -> TrainState:
  """A fresh TrainState placed on ``mesh``; b_dec and the norm factor come from first_batch.

  Args:
    first_batch: [n, d_in] activations (any n); must be finite.
    init_params: warm start from these parameters (another SAE's, same config shapes)
      instead of a fresh initialisation; the norm factor still comes from first_batch.
  """
  check_batch(first_batch, sae_cfg.d_in, "first batch")
  first_batch = jnp.asarray(first_batch, jnp.float32)
  if not bool(jnp.isfinite(first_batch).all()):
    raise DataError("the first batch contains NaN or Inf; b_dec cannot be initialised from it")
  sharding.check_divisible(sae_cfg.d_sae, mesh, "model", "d_sae")
  if tcfg.encoder_init in FITTED_INITS and sae_cfg.architecture != "topk":
    raise ConfigError(f"encoder_init={tcfg.encoder_init!r} needs architecture 'topk' (got "
                      f"{sae_cfg.architecture!r}); for it use 'linear' or 'tied'")
  key = jax.random.key(tcfg.seed) if key is None else key
  shardings = state_shardings(sae_cfg, tcfg, mesh)
  if init_params is not None:
    want = jax.eval_shape(lambda: registry.get(sae_cfg.architecture).init_params(
        jax.random.key(0), sae_cfg))
    got = {k: tuple(jnp.shape(v)) for k, v in init_params.items()}
    bad = {k: (got.get(k), tuple(v.shape)) for k, v in want.items() if got.get(k) != v.shape}
    if bad:
      raise ConfigError(f"warm-start parameters do not fit the SAE: {bad} (given, wanted)")
    init_params = {k: np.asarray(init_params[k]) for k in want}
  init = jax.jit(lambda x, k, p: _init_state(sae_cfg, tcfg, x, k, p), out_shardings=shardings)
  return init(jax.device_put(first_batch, NamedSharding(mesh, P())), key, init_params)
