"""The TopK train step's update applied block by block over the latents (``update_blocks``).

The autodiff step forms each big weight's whole gradient ([D, M_l] and [M_l, D] per chip),
all-reduces it over "data" and then runs Adam over it. With the latents unsharded that is one
full-size gradient per weight on every chip: for the paper's SAE (32,768 x 2,048, bfloat16)
128 MiB each, more than the whole temp budget the planner holds a v5e chip to. Here the
gradients are written out by hand from the sparse codes: the selected (token, latent) pairs
are sorted by latent once, then for one block of latents at a time the block's rows of both
gradients are summed from that block's pairs only (windows of a while loop), all-reduced over
"data", projected, passed through Adam and written back into the (donated) parameters and
moments. Only one block's gradients are ever live.

Same objective and update as the autodiff step (results agree to float rounding). The price:
the sort, and each block's last window of pairs is partly empty, so the sparse backward moves
somewhat more (the planner: a 1.36x longer step roofline at 16 blocks on v5e-16, FLOPs within
2 % of the whole-array step's). TopK only, with sparse AuxK.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.kernels import owned_rows, sparse_decode
from sae_jax.kernels.topk import code_cotangents, encoder_bias_grads
from sae_jax.saes import registry
from sae_jax.saes.base import ShardCtx, fired_counts, normalize_inputs
from sae_jax.train.loss import batch_stats, loss_terms

# The big weights and the axis their latents run along.
BIG = {"W_enc": 1, "W_dec": 0}


def param_dicts(tree: Any, names: frozenset[str]) -> list[dict]:
  """The dicts keyed by exactly the parameter names in an optax state (Adam's mu and nu)."""
  if isinstance(tree, dict) and set(tree) == names:
    return [tree]
  if isinstance(tree, (tuple, list)):
    return [d for t in tree for d in param_dicts(t, names)]
  return []


def with_param_dicts(tree: Any, names: frozenset[str], dicts: list[dict]) -> Any:
  """``tree`` with its parameter-keyed dicts replaced, in :func:`param_dicts` order."""
  it = iter(dicts)

  def walk(t):
    if isinstance(t, dict) and set(t) == names:
      return next(it)
    if isinstance(t, tuple) and hasattr(t, "_fields"):  # a NamedTuple state
      return type(t)(*[walk(c) for c in t])
    if isinstance(t, (tuple, list)):
      return type(t)(walk(c) for c in t)
    return t

  return walk(tree)


def project_decoder_grad(g_dec: jax.Array, w_dec: jax.Array) -> jax.Array:
  """[M, D] gradient without each row's component along that (unit) decoder row, in the
  gradient's dtype (computed in float32; a float32 result would promote Adam's moments)."""
  w = w_dec.astype(jnp.float32)
  g = g_dec.astype(jnp.float32)
  return (g - jnp.sum(g * w, axis=-1, keepdims=True) * w).astype(g_dec.dtype)


def unit_rows(w: jax.Array) -> jax.Array:
  """[M, D] rows scaled to unit norm (in float32, stored in w's dtype)."""
  w32 = w.astype(jnp.float32)
  return (w32 / jnp.maximum(jnp.linalg.norm(w32, axis=-1, keepdims=True), 1e-12)).astype(w.dtype)


def _sparse_cotangents(codes, params, terms, m_local, k_aux, kernels):
  """Per selected pair: decoder weights and the encoder's pre-activation cotangents.

  Returns lists (main codes, then AuxK's) of rows [n, J] (local; m_local: not owned), the
  decoder gradient's weights [n, J] (the codes) and sources [n, D] (the cotangent each
  reconstruction gets), and the encoder's weights [n, J] (d loss / d pre-activation),
  as the sparse kernels' backward passes compute them.
  """
  W_dec = params["W_dec"]
  parts = [(codes.indices, codes.values, terms.g_xhat)]
  if k_aux:
    parts.append((codes.aux_indices, codes.aux_values, terms.g_aux))
  rows, dec_w, dec_src, enc_w = [], [], [], []
  for idx, vals, g in parts:
    r, owned = owned_rows(idx, m_local, "model")
    rows.append(r)
    dec_src.append(g)
    dec_w.append(jnp.where(owned, vals, 0.0).astype(jnp.float32))
    # The encoder's backward keeps the live codes' cotangents (ReLU).
    enc_w.append(jnp.where(vals > 0, code_cotangents(r, owned, g, W_dec, kernels), 0.0))
  return rows, dec_w, dec_src, enc_w


class Entries(NamedTuple):
  """The selected (token, latent) pairs of this shard sorted by local latent row, padded by one
  window (rows m_local, weights 0) so every window slice is in bounds. [E + window] each."""

  rows: jax.Array  # local latent row (m_local: not this shard's)
  dec_w: jax.Array  # the decoder gradient's weight (the code) ...
  dec_src: jax.Array  # ... times this row of [g_xhat; g_aux]
  enc_w: jax.Array  # the encoder gradient's weight (d loss / d pre-activation) ...
  enc_src: jax.Array  # ... times this row of xc
  starts: jax.Array  # [blocks + 1] where each block's pairs begin


def sort_entries(cot, n: int, m_local: int, blocks: int, window: int) -> Entries:
  """Sort the pairs of :func:`_sparse_cotangents` by row (one argsort of N*(k + k_aux))."""
  rows, dec_w, _, enc_w = cot
  tokens = [jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], r.shape) for r in rows]
  flat = lambda parts: jnp.concatenate([p.reshape(-1) for p in parts])
  r = flat(rows)
  order = jnp.argsort(r, stable=True)
  pad = lambda a, v: jnp.pad(a[order], (0, window), constant_values=v)
  r = pad(r, m_local)
  block = m_local // blocks
  return Entries(
      rows=r, dec_w=pad(flat(dec_w), 0.0),
      dec_src=pad(flat([t + i * n for i, t in enumerate(tokens)]), 0),  # AuxK: rows of g_aux
      enc_w=pad(flat(enc_w), 0.0), enc_src=pad(flat(tokens), 0),
      starts=jnp.searchsorted(r, jnp.arange(blocks + 1, dtype=r.dtype) * block).astype(
          jnp.int32))


# Pairs one trip of a block's gradient loop gathers: [window, D] float32 rows of about this
# many bytes (the TPU's row-group budget, kernels/rows.py). A benchmark knob.
WINDOW_BYTES = 32 << 20


def window_size(n_pairs: int, d: int, blocks: int) -> int:
  """Pairs per trip of a block's gradient loop: at most WINDOW_BYTES of rows, and about a
  quarter of a block's average share, so the last, partly empty trip of each block wastes
  little."""
  return max(1, min(n_pairs, WINDOW_BYTES // (4 * d), -(-n_pairs // (4 * blocks))))


def block_grads(e: Entries, dec_table, enc_table, b, block: int, window: int, trips: float):
  """Rows [b*block, (b+1)*block) of both gradients, from that block's pairs only.

  dec_table: [n or 2n, D] (g_xhat; g_aux); enc_table: [n, D] (xc). Returns (W_dec's rows,
  W_enc's columns as rows), [block, D] float32 each. A loop over windows of the block's pairs:
  its trips vary by block and shard; over all blocks they are at most E / window + blocks, the
  ``trips`` per loop the planner counts (:mod:`sae_jax.planning.costs`).
  """
  start, end, off = e.starts[b], e.starts[b + 1], b * block
  d = enc_table.shape[1]

  def body(carry):
    pos, g_dec, g_enc = carry
    take = lambda a: lax.dynamic_slice_in_dim(a, pos, window)
    live = pos + jnp.arange(window) < end
    rows = jnp.where(live, take(e.rows) - off, block)  # block: dropped
    add = lambda acc, w, src, table: acc.at[rows].add(
        take(w)[:, None] * table[take(src)].astype(jnp.float32), mode="drop")
    return (pos + window, add(g_dec, e.dec_w, e.dec_src, dec_table),
            add(g_enc, e.enc_w, e.enc_src, enc_table))

  zeros = jnp.zeros((block, d), jnp.float32)
  with jax.named_scope(f"while_trips_{trips:.4g}"):
    return lax.while_loop(lambda c: c[0] < end, body, (start, zeros, zeros))[1:]


def _update_blocks(big, dicts, opt_state, names, cot, xc, ok, *, tx, blocks, block,
                   normalize_decoder):
  """Scan over latent blocks: gradient rows, all-reduce, Adam, write back. Returns new
  (big params, their moment dicts)."""
  n, d = xc.shape
  n_pairs = sum(r.size for r in cot[0])
  window = window_size(n_pairs, d, blocks)
  entries = sort_entries(cot, n, block * blocks, blocks, window)
  dec_table = jnp.concatenate(cot[2], 0)
  trips = n_pairs / window / blocks + 1
  dtypes = {k: big[k].dtype for k in BIG}

  def body(carry, b):
    p, ds = carry
    off = b * block
    g_dec, g_enc = block_grads(entries, dec_table, xc, b, block, window, trips)
    g = {"W_enc": lax.psum(g_enc.T.astype(dtypes["W_enc"]), "data"),
         "W_dec": lax.psum(g_dec.astype(dtypes["W_dec"]), "data")}
    take = lambda n, a: lax.dynamic_slice_in_dim(a, off, block, axis=BIG[n])
    p_b = {n: take(n, p[n]) for n in BIG}
    if normalize_decoder:
      g["W_dec"] = project_decoder_grad(g["W_dec"], p_b["W_dec"])
    s_b = with_param_dicts(opt_state, names, [{n: take(n, d[n]) for n in BIG} for d in ds])
    updates, s_new = tx.update(g, s_b, p_b)
    new_p = optax.apply_updates(p_b, updates)
    if normalize_decoder:
      new_p["W_dec"] = unit_rows(new_p["W_dec"])
    # A non-finite batch changes nothing; moments keep their dtype (as in the step's update).
    keep = lambda new, old: jnp.where(ok, new.astype(old.dtype), old)
    put = lambda n, a, v: lax.dynamic_update_slice_in_dim(a, v, off, axis=BIG[n])
    p = {n: put(n, p[n], keep(new_p[n], p_b[n])) for n in BIG}
    new_ds = param_dicts(s_new, frozenset(BIG))
    ds = [{n: put(n, d[n], keep(nd[n], take(n, d[n]))) for n in BIG} for d, nd in zip(ds, new_ds)]
    return (p, ds), None

  return lax.scan(body, (big, dicts), jnp.arange(blocks))[0]


def shard_body(params, opt_state, buffers, tsf, x_raw, ok, *, sae_cfg: SAEConfig,
               tcfg: TrainConfig, tx: optax.GradientTransformation, n_global: int, k_aux: int,
               k_aux_cfg: int, blocks: int):
  """One shard's forward, loss and block-wise update (inside ``shard_map``; local shapes:
  x_raw [n, D], W_enc [D, M_l], W_dec [M_l, D]). ``ok``: the batch is finite (else the state
  is returned unchanged). Returns (params, opt_state, fired [M_l], metrics)."""
  arch = registry.get(sae_cfg.architecture)
  ctx = ShardCtx(data_axis="data", model_axis="model", n_global=n_global, kernels=tcfg.kernels)
  x, _ = normalize_inputs(x_raw, sae_cfg.normalize, buffers["norm_scale"])
  stats = batch_stats(x, tsf, tcfg.dead_tokens, ctx)
  codes = arch.sparse_codes(params, x, stats.dead, sae_cfg, ctx, sae_cfg.k, k_aux)
  W_dec = params["W_dec"]
  m_local = W_dec.shape[0]
  decode = lambda v, i: sparse_decode(v, i, W_dec, "model", tcfg.kernels)
  partial = decode(codes.values, codes.indices)
  aux = decode(codes.aux_values, codes.aux_indices) if k_aux else None
  terms = loss_terms(partial, aux, jnp.zeros((), jnp.float32), params["b_dec"], x, stats,
                     recon_loss=arch.recon_loss, auxk_coef=tcfg.auxk_coef,
                     k_aux_cfg=k_aux_cfg, ctx=ctx)
  fired = ctx.psum_data(fired_counts(codes.indices, codes.values, m_local, "model"))
  metrics = {**terms.metrics, "l0": ctx.psum_model(fired.sum()).astype(jnp.float32) / n_global}

  cot = _sparse_cotangents(codes, params, terms, m_local, k_aux, tcfg.kernels)
  rows, _, _, enc_w = cot
  # The small parameters' gradients in one piece (as the encoder's backward pass forms them).
  d_b_enc, d_b_dec = encoder_bias_grads(jnp.concatenate(rows, 1), jnp.concatenate(enc_w, 1),
                                        params["W_enc"])
  small = {"b_enc": ctx.psum_data(d_b_enc.astype(params["b_enc"].dtype))}
  b_dec_dtype = params["b_dec"].dtype
  small["b_dec"] = (ctx.psum_model(ctx.psum_data(d_b_dec.astype(b_dec_dtype)))
                    + ctx.psum_data(terms.g_xhat.sum(0)).astype(b_dec_dtype))

  names = frozenset(params)
  dicts = param_dicts(opt_state, names)
  small_in = with_param_dicts(opt_state, names, [{n: d[n] for n in small} for d in dicts])
  updates, small_state = tx.update(small, small_in, {n: params[n] for n in small})
  new_small = optax.apply_updates({n: params[n] for n in small}, updates)
  # A non-finite batch changes nothing (the step counts included).
  keep = lambda new, old: jnp.where(ok, new.astype(old.dtype), old)
  new_small = jax.tree.map(keep, new_small, {n: params[n] for n in small})
  small_state = jax.tree.map(keep, small_state, small_in)

  xc = x.astype(jnp.float32) - params["b_dec"].astype(jnp.float32)
  m_block = m_local // blocks
  big, big_dicts = _update_blocks(
      {n: params[n] for n in BIG}, [{n: d[n] for n in BIG} for d in dicts], opt_state,
      names, cot, xc, ok, tx=tx, blocks=blocks, block=m_block,
      normalize_decoder=arch.normalize_decoder)
  new_dicts = [{**sd, **bd} for sd, bd in zip(param_dicts(small_state, frozenset(small)),
                                             big_dicts)]
  new_state = with_param_dicts(small_state, frozenset(small), new_dicts)
  return {**new_small, **big}, new_state, fired, metrics
