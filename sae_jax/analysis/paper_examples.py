"""Our SAEs' examples collected as the paper's v1 code collects them.

The authors' ``collect_feature_pattern.py`` (llm-jp/llm-jp-sae at d9eb8c6) does, per feature:

1. ``max_pre``: a running maximum, started at zero, of the SAE encoder's output (the
   ``nn.Linear`` hooked before ReLU / top-k: ``(x_norm - b_dec) @ W_enc + b_enc``) over every
   position but the first (BOS) of every test sequence; the threshold is
   ``act_threshold_p * max_pre`` = 0.7 x that.
2. A sequence is an example when, at some token, the feature is among that token's top-k and its
   top-k value (after ReLU) is strictly above the threshold (``act_thresholds[latent_indices] <
   latent_acts``); each sequence counts once per feature.
3. The first ``num_examples`` = 50 such sequences in the order the test split is read (the split
   was shuffled once when it was made; the loader does not shuffle).
4. On every token of the sequence but BOS the encoder output of the feature is recorded; when
   saved, each value ``a`` becomes ``0 if a < 0 else ceil(10 * a / max_act)`` with ``max_act``
   the largest recorded value over the feature's own examples (not ``max_pre``).

Here the test split is the evaluation set (drawn with a seed of its own) and "every position but
BOS" is its counted tokens (``mask``: BOS, padding and special tokens excluded). The authors ran
the model and the SAE in bfloat16; these are the SAE's own float32 pre-activations.

Memory: no [tokens, d_sae] array on the host. The first pass (stats.py) reduces ``max_pre`` on
device per batch; the sequences are chosen from the top-k codes already in memory; the second
pass re-runs the model on the evaluation batches holding chosen sequences and gathers, on device,
the [pairs, T] pre-activations of the chosen (feature, sequence) pairs: [M, E, T] values.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.examples import MAX_QUANT
from sae_jax.saes.base import normalize_inputs

THRESHOLD_FRACTION = 0.7  # the authors' act_threshold_p
N_EXAMPLES = 50  # the authors' num_examples


def pre_activations(sae, x: jax.Array) -> jax.Array:
  """[n, D] raw activations -> [n, M] float32 encoder output before ReLU / top-k (traceable)."""
  xn, _ = normalize_inputs(x, sae.cfg.normalize, sae.buffers["norm_scale"])
  return sae.architecture.pre_acts(sae.params, xn, sae.cfg)


def max_pre_activation(sae, x: jax.Array) -> jax.Array:
  """[M] max(0, the largest pre-activation over the rows of ``x`` [n, D]) (traceable; the
  authors' running max starts at zero)."""
  return jnp.max(pre_activations(sae, x), axis=0, initial=0.0)


def first_sequences(values: np.ndarray, indices: np.ndarray, seq: np.ndarray, n_seqs: int,
                    max_pre: np.ndarray, n: int = N_EXAMPLES,
                    fraction: float = THRESHOLD_FRACTION, chunk: int = 1 << 16) -> np.ndarray:
  """[M, n] int64: per feature, the first ``n`` sequences (ascending, -1 after the last) where a
  top-k code [N, k] (``values``, ``indices``; row r in sequence ``seq[r]``, non-decreasing, <
  ``n_seqs``) is strictly above ``fraction * max_pre`` (float32)."""
  m = max_pre.shape[0]
  thr = max_pre.astype(np.float32) * np.float32(fraction)
  out = np.full((m, n), -1, np.int64)
  count = np.zeros(m, np.int64)
  for lo in range(0, values.shape[0], chunk):
    v, i = values[lo:lo + chunk], indices[lo:lo + chunk].astype(np.int64)
    hit = v > thr[i]
    s = np.broadcast_to(seq[lo:lo + chunk, None], v.shape)[hit].astype(np.int64)
    key = np.unique(i[hit] * n_seqs + s)  # by feature, then sequence; each pair once
    f, s = key // n_seqs, key % n_seqs
    # A sequence split across two chunks: its pair was already counted in the previous one.
    new = ~((count[f] > 0) & (out[f, np.maximum(count[f] - 1, 0)] == s))
    f, s = f[new], s[new]
    rank = np.arange(f.size) - np.searchsorted(f, f, side="left") + count[f]
    keep = rank < n
    out[f[keep], rank[keep]] = s[keep]
    count += np.bincount(f[keep], minlength=m)
  return out


def _bucket(n: int) -> int:
  """Pairs per device gather, padded to a power of two (few compilations)."""
  return max(64, 1 << (n - 1).bit_length())


def example_pre_activations(saes: dict, chosen: dict, evalset, acts_fn: Callable,
                            seqs_per_batch: int) -> dict:
  """{name: float32 [M, E, T]}: the pre-activation of each feature on every position of each of
  its chosen sequences (``chosen[name]``: [M, E], -1 where none; ``saes``: {name: (sae,
  hook)}). Re-runs ``acts_fn(ids) -> {hook: [b, T, d]}`` on the evaluation batches (the first
  pass's batches) that hold a chosen sequence."""
  t = evalset.ids.shape[1]
  gather = {name: jax.jit(lambda a, b, f, sae=sae: pre_activations(
      sae, a.reshape(-1, a.shape[-1])).reshape(a.shape[0], a.shape[1], -1)[b, :, f])
            for name, (sae, _) in saes.items()}
  flat = {name: c.reshape(-1) for name, c in chosen.items()}
  order = {name: np.argsort(c, kind="stable") for name, c in flat.items()}
  out = {name: np.zeros(c.shape + (t,), np.float32) for name, c in chosen.items()}
  for s0, ids, _ in evalset.batches(seqs_per_batch):
    spans = {name: np.searchsorted(flat[name], [s0, s0 + len(ids)], sorter=order[name])
             for name in saes}
    if all(lo == hi for lo, hi in spans.values()):
      continue
    acts = acts_fn(ids)
    for name, (_, hook) in saes.items():
      sel = order[name][spans[name][0]:spans[name][1]]  # flat (feature, slot) positions
      if sel.size == 0:
        continue
      p = _bucket(sel.size)
      b = np.zeros(p, np.int32)
      f = np.zeros(p, np.int32)
      b[:sel.size] = flat[name][sel] - s0
      f[:sel.size] = sel // chosen[name].shape[1]
      vals = np.asarray(gather[name](acts[hook], b, f))
      out[name].reshape(-1, t)[sel] = vals[:sel.size]
  return out


def quantise_examples(pre: np.ndarray, chosen: np.ndarray, mask: np.ndarray,
                      chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(int8 [M, E, T] quantised values, float32 [M] ``max_act``) of the chosen sequences' counted
  tokens (``mask`` [S, T]): the authors' ``0 if a < 0 else ceil(10 * a / max_act)``, ``max_act``
  the largest value over the feature's examples (0 off the counted tokens and unused slots)."""
  m = chosen.shape[0]
  q = np.zeros(pre.shape, np.int8)
  top = np.full(m, -np.inf, np.float32)
  for lo in range(0, m, chunk):
    c = chosen[lo:lo + chunk]
    valid = (c >= 0)[:, :, None] & mask[np.maximum(c, 0)]
    v = pre[lo:lo + chunk]
    t = np.where(valid, v, -np.inf).max(axis=(1, 2))
    top[lo:lo + chunk] = t
    v64 = v.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      x = np.ceil(v64 * MAX_QUANT / t.astype(np.float64)[:, None, None])
    q[lo:lo + chunk] = np.where(valid & (v64 > 0) & (t > 0)[:, None, None], x, 0)
  return q, top


def paper_examples(saes: dict, codes: dict, max_pre: dict, evalset, acts_fn: Callable,
                   seqs_per_batch: int, n: int = N_EXAMPLES,
                   fraction: float = THRESHOLD_FRACTION) -> dict:
  """{name: (chosen sequences [M, n] (-1: none), quantised values int8 [M, n, T], max_act
  [M])} of several SAEs ({name: (sae, hook)}) from their top-k codes over the evaluation set's
  counted tokens ({name: (values, indices) [N, k]}) and ``max_pre`` ({name: [M]})."""
  seq = np.nonzero(evalset.mask)[0]
  n_seqs = evalset.ids.shape[0]
  chosen = {name: first_sequences(v, i, seq, n_seqs, max_pre[name], n, fraction)
            for name, (v, i) in codes.items()}
  pre = example_pre_activations(saes, chosen, evalset, acts_fn, seqs_per_batch)
  out = {}
  for name in saes:
    q, top = quantise_examples(pre.pop(name), chosen[name], evalset.mask)
    out[name] = (chosen[name], q, top)
  return out
