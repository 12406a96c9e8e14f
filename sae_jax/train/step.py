"""The jitted SAE train step over a ("data", "model") mesh.

Tokens are split over "data", latents over "model". The loss and its gradient are computed per
shard inside ``shard_map`` with explicit collectives (no autodiff through a collective): the
architecture's forward is differentiated with ``jax.vjp`` against the cotangent of the global
loss, then gradients are summed over "data" (and over "model" for the parameters every latent
shard shares, i.e. b_dec). The optimizer update, the decoder projection and renormalisation
then run on the sharded global arrays. A batch with NaN/Inf is skipped and counted.
``TrainConfig.update_blocks`` > 1 (TopK) runs the update block by block over the latents
instead (:mod:`sae_jax.train.blockwise`), never forming a whole gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_jax import sharding
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError
from sae_jax.kernels import sparse_ops
from sae_jax.saes import registry
from sae_jax.saes.base import ShardCtx, TrainForward, TrainInfo, normalize_inputs
from sae_jax.train import blockwise
from sae_jax.train.loss import batch_stats, loss_terms
from sae_jax.train.state import (TOKENS_SINCE_FIRED_CAP, TrainState, make_optimizer,
                                 state_shardings)

METRIC_NAMES = ("loss", "recon_loss", "mse", "fvu", "l0", "aux_loss", "penalty",
                "dead_fraction", "skipped")


def _shard_body(params, buffers, tsf, x_raw, *, sae_cfg: SAEConfig, tcfg: TrainConfig,
                n_global: int, k_aux: int, k_aux_cfg: int, aux_capacity: int,
                replicated_over_model: frozenset[str]):
  """One shard's loss, gradients and statistics. Shapes are local: x_raw [n, D], W_enc [D, M_l]."""
  arch = registry.get(sae_cfg.architecture)
  ctx = ShardCtx(data_axis="data", model_axis="model", n_global=n_global,
                 aux_capacity=aux_capacity, kernels=tcfg.kernels)
  x, _ = normalize_inputs(x_raw, sae_cfg.normalize, buffers["norm_scale"])
  stats = batch_stats(x, tsf, tcfg.dead_tokens, ctx)

  def forward(p):
    return arch.train_forward(p, buffers, x, stats.dead, sae_cfg, tcfg, ctx, k_aux)

  out, pullback, info = jax.vjp(forward, params, has_aux=True)
  terms = loss_terms(out.partial_xhat, out.aux_partial if k_aux else None, out.penalty,
                     params["b_dec"], x, stats, recon_loss=arch.recon_loss,
                     auxk_coef=tcfg.auxk_coef, k_aux_cfg=k_aux_cfg, ctx=ctx)
  g_xhat, g_aux = terms.g_xhat, terms.g_aux

  (grads,) = pullback(TrainForward(g_xhat, jnp.ones((), jnp.float32), g_aux))
  grads = {name: ctx.psum_data(g) for name, g in grads.items()}
  for name in replicated_over_model:
    grads[name] = ctx.psum_model(grads[name])
  grads["b_dec"] = grads["b_dec"] + ctx.psum_data(g_xhat.sum(0)).astype(grads["b_dec"].dtype)

  fired = ctx.psum_data(info.fired)
  metrics = {**terms.metrics,
             "l0": ctx.psum_model(fired.sum()).astype(jnp.float32) / n_global}
  return grads, fired, info.threshold, metrics


# Latent-indexed parameters and the axis of their latents.
LATENT_AXES = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def lazy_latents(new: dict, old: dict, touched: jax.Array) -> dict:
  """``new`` with the old W_enc columns, b_enc and W_dec rows of latents not ``touched`` [M].

  A latent that left the top-k gets a zero gradient, yet Adam's momentum keeps moving it the way
  that pushed it out (about ten steps of lr at b1 = 0.9): out of reach, it is dead for good. Kept
  where it left, it can come back (quality_note.md, round 9); a selected latent moves as before.
  """
  out = dict(new)
  for name, axis in LATENT_AXES.items():
    if name in out:
      shape = [1] * out[name].ndim
      shape[axis] = -1
      out[name] = jnp.where(touched.reshape(shape), new[name], old[name])
  return out


# The fewest AuxK columns a program computes: each width is its own compiled program, and the
# narrow ones (1, 2, 4, ... while the first latents die) cost compiles, not steps. The extra
# columns select only latents that are not dead, whose values are zero, so results are the same.
MIN_AUX_BUCKET = 32

# Dense AuxK ("auto") when k_aux columns are at least this share of the dead-latent block: the
# sparse path moves k_aux rows per token, the dense one multiplies by the whole block.
DENSE_AUXK_MIN_DENSITY = 1 / 64


def _dense_auxk(impl: str, mesh: Mesh, arch) -> str:
  """Resolve ``auxk_impl`` for this mesh: "dense", "auto" (by density) or "sparse"."""
  dense_ok = arch.sparse and arch.name in ("topk", "batchtopk") and mesh.shape["model"] == 1
  if impl == "sparse" or not dense_ok:
    return "sparse"
  if impl == "dense":
    return "dense"
  return "auto" if mesh.devices.flat[0].platform != "cpu" else "sparse"


def _check_blocks(blocks: int, arch, d_sae: int, mesh: Mesh) -> int:
  """``update_blocks``, checked against the architecture and each chip's latents."""
  if blocks == 1:
    return 1
  if arch.name != "topk":
    raise ConfigError(f"update_blocks={blocks} needs architecture 'topk' (got {arch.name!r}); "
                      f"other architectures update whole arrays (update_blocks=1)")
  m_local = d_sae // mesh.shape["model"]
  if m_local % blocks:
    raise ConfigError(f"update_blocks={blocks} must divide the latents on each chip "
                      f"({m_local} = d_sae {d_sae} / model axis {mesh.shape['model']})")
  return blocks


class TrainStep:
  """``step(state, x) -> (state, metrics)`` for x: [batch_size, d_in] on a mesh.

  Programs are compiled lazily per AuxK width: none while no latent is dead, else k_aux
  columns, or fewer (a power of two) while fewer latents are dead. AuxK costs a second top-k
  and that many extra sparse rows per token, or, computed densely (``TrainConfig.auxk_impl``),
  matmuls over a block of dead-latent columns (a power of two that holds them, so a program
  per such width). The choice is read from the input state (one scalar sync per step), so a
  resumed run makes the same choice as an uninterrupted one. The
  state is donated. A batch with NaN/Inf leaves the state unchanged except ``nan_batches``
  (metrics NaN, ``skipped`` 1).
  """

  def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig, mesh: Mesh):
    self.arch = registry.get(sae_cfg.architecture)
    # "auto" kernels: the platform's choice, fixed here so every program of the step agrees.
    tcfg = dataclasses.replace(tcfg, kernels=sparse_ops.resolve_kernels(
        tcfg.kernels, mesh.devices.flat[0].platform))
    self.sae_cfg, self.tcfg, self.mesh = sae_cfg, tcfg, mesh
    sharding.check_divisible(tcfg.batch_size, mesh, "data", "batch_size")
    sharding.check_divisible(sae_cfg.d_sae, mesh, "model", "d_sae")
    k_aux = tcfg.resolved_aux_k(sae_cfg.d_in, sae_cfg.d_sae) if self.arch.sparse else 0
    self.k_aux = k_aux if tcfg.auxk_coef > 0 else 0
    self.tx = make_optimizer(sae_cfg, tcfg)
    self.state_shardings = state_shardings(sae_cfg, tcfg, mesh)
    self.x_sharding = sharding.named_sharding(mesh, ("batch", "embed"))
    self._compiled: dict[tuple[int, int], Callable] = {}
    dead_tokens = tcfg.dead_tokens
    self._num_dead = jax.jit(lambda tsf: (tsf >= dead_tokens).sum())
    self.blocks = _check_blocks(tcfg.update_blocks, self.arch, sae_cfg.d_sae, mesh)
    # The block-wise update differentiates the sparse AuxK by hand.
    self.dense_auxk = ("sparse" if self.blocks > 1
                       else _dense_auxk(tcfg.auxk_impl, mesh, self.arch))

  def __call__(self, state: TrainState, x: jax.Array) -> tuple[TrainState, dict]:
    # On a multi-device CPU mesh, done before the data path's next program starts.
    return sharding.settle(self.jitted(*self.aux_plan(state))(state, x), self.mesh)

  def aux_columns(self, state: TrainState) -> int:
    """AuxK columns this state needs: 0 when no latent is dead, else the configured k_aux
    or, while fewer latents are dead, the power of two that holds them all (same result: the
    extra columns would only select non-dead latents, whose values are zero)."""
    return self.aux_plan(state)[0]

  def aux_plan(self, state: TrainState) -> tuple[int, int]:
    """(AuxK columns, dense AuxK capacity) for this state; capacity 0 runs AuxK sparsely.

    Dense AuxK runs when ``auxk_impl`` (resolved for this mesh) says so and k_aux is at least
    DENSE_AUXK_MIN_DENSITY of the capacity: with few columns per many dead latents the sparse
    rows cost less than the dense block."""
    if not self.k_aux:
      return 0, 0
    # Explicit: the one scalar a step reads back (allowed under jax.transfer_guard).
    n = int(jax.device_get(self._num_dead(state.tokens_since_fired)))
    if n == 0:
      return 0, 0
    pow2 = max(1 << (n - 1).bit_length(), MIN_AUX_BUCKET)
    cols = min(self.k_aux, pow2)
    capacity = min(pow2, self.sae_cfg.d_sae)
    dense = self.dense_auxk == "dense" or (
        self.dense_auxk == "auto" and cols >= DENSE_AUXK_MIN_DENSITY * capacity)
    return cols, capacity if dense else 0

  def jitted(self, aux_columns: int, aux_capacity: int = 0) -> Callable:
    """The jitted program for one AuxK width and dense capacity (for ahead-of-time lowering)."""
    key = (aux_columns, aux_capacity)
    if key not in self._compiled:
      rep = NamedSharding(self.mesh, P())
      self._compiled[key] = jax.jit(
          functools.partial(self._step, aux_columns=aux_columns, aux_capacity=aux_capacity),
          in_shardings=(self.state_shardings, self.x_sharding),
          out_shardings=(self.state_shardings, {k: rep for k in METRIC_NAMES}),
          donate_argnums=0)
    return self._compiled[key]

  def _grads(self, aux_columns: int, aux_capacity: int):
    st = self.state_shardings
    p_specs = jax.tree.map(lambda s: s.spec, st.params)
    b_specs = jax.tree.map(lambda s: s.spec, st.buffers)
    tsf_spec = st.tokens_since_fired.spec
    replicated = frozenset(k for k, s in p_specs.items() if "model" not in tuple(s))
    body = functools.partial(_shard_body, sae_cfg=self.sae_cfg, tcfg=self.tcfg,
                             n_global=self.tcfg.batch_size, k_aux=aux_columns,
                             k_aux_cfg=max(self.k_aux, 1), aux_capacity=aux_capacity,
                             replicated_over_model=replicated)
    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(p_specs, b_specs, tsf_spec, self.x_sharding.spec),
                         out_specs=(p_specs, tsf_spec, P(), P()), check_vma=False)

  def _blockwise(self, aux_columns: int):
    """The block-wise update as one shard_map (see :mod:`sae_jax.train.blockwise`)."""
    st = self.state_shardings
    spec = lambda tree: jax.tree.map(lambda s: s.spec, tree)
    body = functools.partial(blockwise.shard_body, sae_cfg=self.sae_cfg, tcfg=self.tcfg,
                             tx=self.tx, n_global=self.tcfg.batch_size, k_aux=aux_columns,
                             k_aux_cfg=max(self.k_aux, 1), blocks=self.blocks)
    return jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(spec(st.params), spec(st.opt_state), spec(st.buffers),
                  st.tokens_since_fired.spec, self.x_sharding.spec, P()),
        out_specs=(spec(st.params), spec(st.opt_state), st.tokens_since_fired.spec, P()),
        check_vma=False)

  def _update(self, state: TrainState, x: jax.Array, ok, aux_columns: int, aux_capacity: int):
    """(params, opt_state, fired, threshold, metrics) after this batch (unchanged if not ok)."""
    params, opt_state, fired, threshold, metrics = self._adam(state, x, ok, aux_columns,
                                                              aux_capacity)
    if self.tcfg.lazy_updates and self.arch.sparse:
      touched = fired > 0
      if aux_columns:  # AuxK trains the dead latents: their updates stand
        touched = touched | (state.tokens_since_fired >= self.tcfg.dead_tokens)
      params = lazy_latents(params, state.params, touched)
    return params, opt_state, fired, threshold, metrics

  def _adam(self, state: TrainState, x: jax.Array, ok, aux_columns: int, aux_capacity: int):
    if self.blocks > 1:
      params, opt_state, fired, metrics = self._blockwise(aux_columns)(
          state.params, state.opt_state, state.buffers, state.tokens_since_fired, x, ok)
      return params, opt_state, fired, jnp.zeros((), jnp.float32), metrics
    grads, fired, threshold, metrics = self._grads(aux_columns, aux_capacity)(
        state.params, state.buffers, state.tokens_since_fired, x)
    params = state.params
    if self.arch.normalize_decoder:
      grads["W_dec"] = blockwise.project_decoder_grad(grads["W_dec"], params["W_dec"])
    updates, opt_state = self.tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    if self.arch.normalize_decoder:
      params["W_dec"] = blockwise.unit_rows(params["W_dec"])
    # The moments keep their dtype (a float32 projected gradient would otherwise promote a
    # bfloat16 moment, changing the state's signature after the first step), and a non-finite
    # batch is skipped: an elementwise select (fused into the update) is far cheaper than a
    # lax.cond, whose branches force copies of the whole donated state.
    keep = lambda a, b: jnp.where(ok, a.astype(b.dtype), b)
    return (jax.tree.map(keep, params, state.params),
            jax.tree.map(keep, opt_state, state.opt_state), fired, threshold, metrics)

  def _step(self, state: TrainState, x: jax.Array, aux_columns: int, aux_capacity: int):
    arch, tcfg, n = self.arch, self.tcfg, self.tcfg.batch_size
    ok = jnp.isfinite(x).all()
    params, opt_state, fired, threshold, metrics = self._update(state, x, ok, aux_columns,
                                                                 aux_capacity)
    tsf = jnp.where(fired > 0, 0, jnp.minimum(state.tokens_since_fired + n,
                                                TOKENS_SINCE_FIRED_CAP))
    buffers = arch.update_buffers(state.buffers, TrainInfo(fired=fired, threshold=threshold),
                                  state.step)
    keep = lambda a, b: jnp.where(ok, a, b)
    new = state.replace(step=keep(state.step + 1, state.step), params=params,
                        opt_state=opt_state, buffers=jax.tree.map(keep, buffers, state.buffers),
                        tokens_since_fired=keep(tsf, state.tokens_since_fired))
    new = new.replace(nan_batches=state.nan_batches + (1 - ok.astype(jnp.int32)))
    metrics = {k: jnp.where(ok, jnp.asarray(v, jnp.float32), jnp.nan)
               for k, v in metrics.items()}
    metrics["dead_fraction"] = jnp.mean(new.tokens_since_fired >= tcfg.dead_tokens,
                                        dtype=jnp.float32)
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return new, {k: metrics[k] for k in METRIC_NAMES}


def make_train_step(sae_cfg: SAEConfig, tcfg: TrainConfig, mesh: Mesh) -> TrainStep:
  """The train step for these configs on ``mesh`` (see :class:`TrainStep`).

  Equal configs on one mesh share one TrainStep, so SAEs trained side by side (seeds) and
  successive runs of one trace compile each program once. A TrainStep holds only programs.
  """
  key = (sae_cfg.to_json(), tcfg.to_json(), mesh)  # configs may hold dicts: keyed as JSON
  step = _STEPS.pop(key, None) or TrainStep(sae_cfg, tcfg, mesh)
  _STEPS[key] = step  # most recently used last
  while len(_STEPS) > _MAX_SHARED_STEPS:
    _STEPS.pop(next(iter(_STEPS)))
  return step


_MAX_SHARED_STEPS = 16
_STEPS: dict[tuple, TrainStep] = {}
