"""Evaluation of an SAE on held-out activations.

Reconstruction statistics here; the model-spliced scores (CE loss recovered, delta LM loss, KL)
join them with the model ports. Statistics are computed in the SAE's normalised input space,
the space its training loss lives in, and reduced batch by batch on device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sae_jax import sharding
from sae_jax.saes import registry
from sae_jax.saes.base import normalize_inputs
from sae_jax.saes.sae import SAE, reconstruct_rows

DENSE_FIRING_RATE = 0.1  # a latent firing on more than this share of tokens counts as dense


@functools.partial(jax.jit, static_argnums=(0,))
def _batch_sums(cfg, params, buffers, x):
  arch = registry.get(cfg.architecture)
  xn, _ = normalize_inputs(x, cfg.normalize, buffers["norm_scale"])
  acts = arch.encode_dense(params, buffers, xn, cfg)
  x_hat = acts @ params["W_dec"].astype(jnp.float32) + params["b_dec"].astype(jnp.float32)
  err = x_hat - xn
  cos = jnp.sum(x_hat * xn, -1) / jnp.maximum(
      jnp.linalg.norm(x_hat, axis=-1) * jnp.linalg.norm(xn, axis=-1), 1e-12)
  fired = (acts > 0).sum(0, dtype=jnp.int32)
  return {"sse": jnp.sum(err ** 2), "sum_x": xn.sum(0), "sum_x2": jnp.sum(xn ** 2),
          "cos": cos.sum(), "fired": fired}


def reconstruction_metrics(sae: SAE, x, batch_size: int = 1024) -> dict[str, float]:
  """mse, fvu, cosine, l0, dead_fraction, dense_fraction of ``sae`` on x [n, d_in].

  dead_fraction: latents that never fire on x; dense_fraction: latents firing on more than
  DENSE_FIRING_RATE of the tokens.
  """
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  if n == 0:
    return {}
  total = None
  for start in range(0, n, batch_size):
    part = jax.device_get(_batch_sums(sae.cfg, sae.params, sae.buffers, x[start:start + batch_size]))
    total = part if total is None else jax.tree.map(np.add, total, part)
  sum_x = np.asarray(total["sum_x"], np.float64)
  variance = float(total["sum_x2"]) - float(sum_x @ sum_x) / n
  fired = np.asarray(total["fired"])
  return {"mse": float(total["sse"]) / n, "fvu": float(total["sse"]) / max(variance, 1e-12),
          "cosine": float(total["cos"]) / n, "l0": float(fired.sum()) / n,
          "dead_fraction": float(np.mean(fired == 0)),
          "dense_fraction": float(np.mean(fired > DENSE_FIRING_RATE * n)), "tokens": n}


def next_token_nll(logits, ids, mask):
  """Next-token NLL over [B, T] ids where both positions are real tokens.

  Returns (sum of NLL, number of predicted tokens, log-probs [B, T-1, V], weights [B, T-1]).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  m = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m), logp, m


@dataclasses.dataclass(frozen=True)
class SpliceReconstruct:
  """A model splice: [B, T, D] -> the SAE's reconstruction of it. Hashable by the SAE config
  alone (the weights come in ``args``), so SAEs of one config share one compiled forward."""

  cfg: object

  def __call__(self, x, args):
    flat = x.reshape(-1, x.shape[-1])
    return reconstruct_rows(self.cfg, args["params"], args["buffers"], flat).reshape(x.shape)


def spliced_metrics(model, sae: SAE, hook: str, batches, max_batches: int | None = None,
                    mesh: Mesh | None = None) -> dict[str, float]:
  """LM-loss metrics with the SAE's reconstruction spliced in at ``hook``.

  ce_clean, ce_sae, ce_ablated (the site zero-ablated), ce_loss_recovered =
  (ce_ablated - ce_sae) / (ce_ablated - ce_clean), delta_lm_loss = ce_sae - ce_clean, and
  kl_sae = mean KL(clean || with SAE) per predicted token. ``batches``: TokenBatch-like items
  with ``ids`` and ``mask`` [B, T]. ``mesh``: the model's mesh when it spans several processes;
  every process then calls this with the same batches and SAE (a collective evaluation: each
  batch split over "data", the SAE replicated), and every process gets the metrics.
  """
  if isinstance(sae, SAE):
    # The weights go in as splice arguments, not in a closure: the compiled forward is then
    # shared by every SAE of one config and keeps none of them alive.
    recon, state = SpliceReconstruct(sae.cfg), {"params": sae.params, "buffers": sae.buffers}
  else:  # anything with reconstruct([N, D]) (a baseline, a peer's SAE): spliced as a closure
    recon = lambda x, args: sae.reconstruct(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    state = {}
  put = jnp.asarray if mesh is None else (
      lambda a: sharding.place(np.asarray(a), mesh, ("batch", "length")))
  if mesh is not None:
    state = jax.tree.map(lambda a: sharding.place(np.asarray(a), mesh), state)
  sums = {"clean": 0.0, "sae": 0.0, "ablated": 0.0, "kl": 0.0}
  count = 0.0
  for i, b in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    ids, mask = put(b.ids), put(b.mask)
    clean = model.logits(ids, mask)
    with_sae = model.logits(ids, mask, splice={hook: recon}, splice_args={hook: state})
    ablated = model.logits(ids, mask, splice={hook: jnp.zeros_like})
    c, n, logp_clean, m = next_token_nll(clean, ids, mask)
    s, _, logp_sae, _ = next_token_nll(with_sae, ids, mask)
    a, _, _, _ = next_token_nll(ablated, ids, mask)
    kl = jnp.sum(jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_sae), -1) * m)
    for k, v in zip(("clean", "sae", "ablated", "kl"), (c, s, a, kl)):
      sums[k] += float(v)
    count += float(n)
  ce = {k: v / max(count, 1.0) for k, v in sums.items()}
  gap = ce["ablated"] - ce["clean"]
  return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_ablated": ce["ablated"],
          "ce_loss_recovered": (ce["ablated"] - ce["sae"]) / gap if abs(gap) > 1e-12 else
          float("nan"), "delta_lm_loss": ce["sae"] - ce["clean"], "kl_sae": ce["kl"],
          "lm_tokens": count}
