"""Per-feature statistics over the evaluation set, reduced on the fly from top-k codes.

Nothing of size [tokens, d_sae] ever exists: each batch is encoded on device into its top-k
codes ([n, k] values and indices), and the host folds those into per-feature counters:

* firing count, activation sum and maximum, firing count and mass per language code;
* (feature, token id) firing counts and activation mass, kept as a sparse sorted key/count table
  (key: feature * vocab + token) merged every few million entries (memory: the number of
  distinct keys, not tokens x k);
* the ``n_examples`` strongest sequences of every feature (each sequence counted once, at its
  maximally activating position): [d_sae, n_examples] value / sequence / position arrays.

Memory is O(d_sae * n_examples + distinct (feature, token) keys + one batch of codes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import jax
import numpy as np

from sae_jax import console
from sae_jax.analysis.paper_examples import max_pre_activation
from sae_jax.languages import N_LANGUAGE_CODES


@dataclasses.dataclass
class FeatureStats:
  """What the labels and the report read of one SAE over the evaluation set."""

  n_tokens: int
  count: np.ndarray  # [M] tokens the feature fired on
  act_sum: np.ndarray  # [M]
  act_max: np.ndarray  # [M]
  lang_count: np.ndarray  # [N_LANGUAGE_CODES, M] firings per language code of the token
  lang_sum: np.ndarray  # [N_LANGUAGE_CODES, M] activation mass per language code
  token_keys: np.ndarray  # sorted feature * vocab + token, [P]
  token_key_counts: np.ndarray  # [P]
  token_key_sums: np.ndarray  # [P] activation mass per key
  vocab: int
  ex_val: np.ndarray  # [M, E] strongest sequences, descending (-inf where none)
  ex_seq: np.ndarray  # [M, E] their sequence index
  ex_pos: np.ndarray  # [M, E] position of the maximum within the sequence
  # The whole population of strong firings (>= a fraction of the feature's max; a second pass
  # over the codes, see ``add_strong_firings``): per language code, and per (feature, token).
  strong_lang: np.ndarray | None = None  # [N_LANGUAGE_CODES, M]
  strong_keys: np.ndarray | None = None  # sorted feature * vocab + token
  strong_counts: np.ndarray | None = None
  # The paper's example set: up to E sequences drawn at random among those where the feature
  # reaches >= the fraction of its max, each at its maximum ([M, E]; -inf where fewer).
  sample_val: np.ndarray | None = None
  sample_seq: np.ndarray | None = None
  sample_pos: np.ndarray | None = None
  # The paper's collection (paper_examples.py): max(0, max pre-activation) [M] from the first
  # pass; the first E sequences above 0.7 x that [M, E] (-1: none), the quantised values on
  # their tokens [M, E, T] (int8) and the max over them they were quantised by [M].
  max_pre: np.ndarray | None = None
  paper_seq: np.ndarray | None = None
  paper_acts: np.ndarray | None = None
  paper_max: np.ndarray | None = None

  def strong_tokens(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, counts) of the feature's strong firings, most frequent first."""
    lo, hi = np.searchsorted(self.strong_keys, [feature * self.vocab,
                                                (feature + 1) * self.vocab])
    toks, counts = self.strong_keys[lo:hi] - feature * self.vocab, self.strong_counts[lo:hi]
    order = np.argsort(-counts, kind="stable")
    return toks[order], counts[order]

  @property
  def d_sae(self) -> int:
    return self.count.shape[0]

  @property
  def frequency(self) -> np.ndarray:
    return self.count / max(self.n_tokens, 1)

  @property
  def mean_act(self) -> np.ndarray:
    return np.where(self.count > 0, self.act_sum / np.maximum(self.count, 1), 0.0)

  @property
  def live(self) -> np.ndarray:
    return self.count > 0

  def token_counts(self, feature: int, mass: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, firing counts - or activation mass) of the feature, largest first."""
    lo, hi = np.searchsorted(self.token_keys, [feature * self.vocab, (feature + 1) * self.vocab])
    toks = self.token_keys[lo:hi] - feature * self.vocab
    counts = (self.token_key_sums if mass else self.token_key_counts)[lo:hi]
    order = np.argsort(-counts, kind="stable")
    return toks[order], counts[order]

  def token_entropy(self) -> np.ndarray:
    """[M] entropy (nats) of each feature's firing-token distribution."""
    f = self.token_keys // self.vocab
    p = self.token_key_counts / np.maximum(self.count[f], 1)
    h = np.zeros(self.d_sae)
    np.add.at(h, f, -p * np.log(np.maximum(p, 1e-30)))
    return h

  def examples(self, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, seq, pos) [M, E] of the example set: the random sample of sequences at >=
    ``fraction`` of the max when drawn (``add_strong_firings``), else the strongest ones."""
    if self.sample_val is not None:
      val, seq, pos = self.sample_val, self.sample_seq, self.sample_pos
    else:
      val, seq, pos = self.ex_val, self.ex_seq, self.ex_pos
    mask = np.isfinite(val) & (val >= fraction * self.act_max[:, None]) & (
        self.act_max[:, None] > 0)
    return mask, np.where(mask, seq, 0), np.where(mask, pos, 0)


class StatsAccumulator:
  """Folds batches of top-k codes into :class:`FeatureStats` (see the module docstring)."""

  def __init__(self, d_sae: int, vocab: int, n_examples: int = 50, merge_every: int = 4_000_000):
    self.d_sae, self.vocab, self.E = d_sae, vocab, n_examples
    self.n_tokens = 0
    self.count = np.zeros(d_sae, np.int64)
    self.act_sum = np.zeros(d_sae, np.float64)
    self.act_max = np.zeros(d_sae, np.float32)
    self.lang_count = np.zeros((N_LANGUAGE_CODES, d_sae), np.int64)
    self.lang_sum = np.zeros((N_LANGUAGE_CODES, d_sae), np.float64)
    self.keys, self.counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    self.sums = np.zeros(0, np.float64)
    self._pending_keys: list[np.ndarray] = []
    self._pending_vals: list[np.ndarray] = []
    self._pending_n = 0
    self.merge_every = merge_every
    self.ex_val = np.full((d_sae, n_examples), -np.inf, np.float32)
    self.ex_seq = np.zeros((d_sae, n_examples), np.int64)
    self.ex_pos = np.zeros((d_sae, n_examples), np.int32)
    self._cand: list[tuple] = []
    self._cand_n = 0
    self.max_pre = np.zeros(d_sae, np.float32)  # reduced on device per batch (collect_stats)

  def add(self, values: np.ndarray, indices: np.ndarray, token: np.ndarray, seq: np.ndarray,
          pos: np.ndarray, lang: np.ndarray) -> None:
    """Codes [n, k] of n counted tokens with their token id, sequence, position, language."""
    self.n_tokens += values.shape[0]
    k = values.shape[1]
    fire = values > 0
    f = indices[fire].astype(np.int64)
    v = values[fire].astype(np.float32)
    rows = np.nonzero(fire)[0] if k else np.zeros(0, np.int64)
    self.count += np.bincount(f, minlength=self.d_sae)
    self.act_sum += np.bincount(f, weights=v, minlength=self.d_sae)
    np.maximum.at(self.act_max, f, v)
    lang_r = np.clip(lang[rows].astype(np.int64), 0, N_LANGUAGE_CODES - 1)
    lf = lang_r * self.d_sae + f
    size = N_LANGUAGE_CODES * self.d_sae
    self.lang_count += np.bincount(lf, minlength=size).reshape(N_LANGUAGE_CODES, self.d_sae)
    self.lang_sum += np.bincount(lf, weights=v, minlength=size).reshape(N_LANGUAGE_CODES,
                                                                        self.d_sae)
    self._pending_keys.append(f * self.vocab + token[rows].astype(np.int64))
    self._pending_vals.append(v)
    self._pending_n += f.size
    if self._pending_n >= self.merge_every:
      self._merge_token_keys()
    # Each (feature, sequence) once, at its maximum: sort by (feature, sequence, -value).
    s = seq[rows].astype(np.int64)
    order = np.lexsort((-v, s, f))
    f, s, v, p = f[order], s[order], v[order], pos[rows][order].astype(np.int32)
    first = np.ones(f.size, bool)
    first[1:] = (f[1:] != f[:-1]) | (s[1:] != s[:-1])
    self._cand.append((f[first], v[first], s[first], p[first]))
    self._cand_n += int(first.sum())
    if self._cand_n >= self.merge_every // 2:
      self._merge_examples()

  def _merge_token_keys(self) -> None:
    if not self._pending_keys:
      return
    keys = np.concatenate([self.keys] + self._pending_keys)
    counts = np.concatenate([self.counts, np.ones(self._pending_n, np.int64)])
    sums = np.concatenate([self.sums] + self._pending_vals)
    uniq, inv = np.unique(keys, return_inverse=True)
    self.keys = uniq
    self.counts = np.bincount(inv, weights=counts, minlength=uniq.size).astype(np.int64)
    self.sums = np.bincount(inv, weights=sums, minlength=uniq.size)
    self._pending_keys, self._pending_vals, self._pending_n = [], [], 0

  def _merge_examples(self) -> None:
    if not self._cand:
      return
    have = np.isfinite(self.ex_val)
    fe = np.nonzero(have)
    f = np.concatenate([fe[0]] + [c[0] for c in self._cand])
    v = np.concatenate([self.ex_val[have]] + [c[1] for c in self._cand])
    s = np.concatenate([self.ex_seq[have]] + [c[2] for c in self._cand])
    p = np.concatenate([self.ex_pos[have]] + [c[3] for c in self._cand])
    order = np.lexsort((s, -v, f))  # ties broken by sequence: deterministic
    f, v, s, p = f[order], v[order], s[order], p[order]
    start = np.searchsorted(f, f, side="left")
    rank = np.arange(f.size) - start
    keep = rank < self.E
    self.ex_val[:] = -np.inf
    self.ex_val[f[keep], rank[keep]] = v[keep]
    self.ex_seq[f[keep], rank[keep]] = s[keep]
    self.ex_pos[f[keep], rank[keep]] = p[keep]
    self._cand, self._cand_n = [], 0

  def finish(self) -> FeatureStats:
    self._merge_token_keys()
    self._merge_examples()
    return FeatureStats(self.n_tokens, self.count, self.act_sum, self.act_max, self.lang_count,
                        self.lang_sum, self.keys, self.counts, self.sums, self.vocab,
                        self.ex_val, self.ex_seq, self.ex_pos, max_pre=self.max_pre)


def collect_stats(sae, batches: Iterable[tuple], vocab: int, n_examples: int = 50,
                  k: int | None = None, log_fn: Callable[[str], None] | None = None,
                  total_tokens: int | None = None,
                  on_codes: Callable[[np.ndarray, np.ndarray], None] | None = None
                  ) -> FeatureStats:
  """Feature statistics of ``sae`` over ``batches`` of (acts [n, d], token, seq, pos, lang).

  The encode runs on device (jit, top-k form; ``k`` defaults to the SAE's k, and SAEs without
  one are read through their ``k`` strongest latents per token, 64 by default); only [n, k]
  codes come back to the host (and go to ``on_codes(values, indices)`` when given).
  """
  one = collect_stats_many({"": (sae, None)}, (({None: b[0]},) + tuple(b[1:]) for b in batches),
                           vocab, n_examples, {"": k} if k else None, log_fn, total_tokens,
                           None if on_codes is None else lambda _, v, i: on_codes(v, i))
  return one[""]


def collect_stats_many(saes: dict, batches: Iterable[tuple], vocab: int, n_examples: int = 50,
                       ks: dict | None = None, log_fn: Callable[[str], None] | None = None,
                       total_tokens: int | None = None,
                       on_codes: Callable[[str, np.ndarray, np.ndarray], None] | None = None
                       ) -> dict[str, FeatureStats]:
  """Statistics of several SAEs over one pass of ``batches``: {name: FeatureStats}.

  ``saes``: {name: (sae, hook)}; each batch is ({hook: acts [n, d]}, token, seq, pos, lang), so
  SAEs of several hooks (or several seeds of one hook) share one model forward per batch. Each
  SAE's largest pre-activation per feature (``FeatureStats.max_pre``) is reduced on device.
  """
  enc = {name: jax.jit(lambda x, sae=sae, k=(ks or {}).get(name) or sae.cfg.k or 64:
                       (sae.encode(x, k=k), max_pre_activation(sae, x)))
         for name, (sae, _) in saes.items()}
  acc = {name: StatsAccumulator(sae.cfg.d_sae, vocab, n_examples)
         for name, (sae, _) in saes.items()}
  t0 = last = time.perf_counter()
  pending = None
  for acts, *meta in batches:
    # Dispatched now; the previous batch is folded on the host while these run.
    codes = {name: enc[name](acts[hook]) for name, (_, hook) in saes.items()}
    if pending is not None:
      _add_batch_codes(acc, pending, on_codes)
    pending = (codes, meta)
    if log_fn is not None and time.perf_counter() - last > 10:
      last = time.perf_counter()
      done = next(iter(acc.values())).n_tokens
      rate = done / (last - t0)
      eta = f", eta {(total_tokens - done) / rate:.0f}s" if total_tokens else ""
      console.live(log_fn)(f"feature stats: {done:,} tokens, {rate:,.0f} tok/s{eta}")
  if pending is not None:
    _add_batch_codes(acc, pending, on_codes)
  return {name: a.finish() for name, a in acc.items()}


def _add_batch_codes(acc: dict, pending, on_codes) -> None:
  """Hand one batch's codes (fetched from device now) to each SAE's accumulator."""
  codes, meta = pending
  for name, ((values, indices), max_pre) in codes.items():
    np.maximum(acc[name].max_pre, np.asarray(max_pre), out=acc[name].max_pre)
    values, indices = np.asarray(values), np.asarray(indices)
    if on_codes is not None:
      on_codes(name, values, indices)
    acc[name].add(values, indices, *meta)


def _mix(x: np.ndarray) -> np.ndarray:
  """A fixed 64-bit integer hash (splitmix64's finaliser): reproducible random priorities."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def add_strong_firings(stats: FeatureStats, values: np.ndarray, indices: np.ndarray,
                       token: np.ndarray, lang: np.ndarray, seq: np.ndarray, pos: np.ndarray,
                       fraction: float, seed: int = 0, chunk: int = 1 << 16) -> None:
  """Second pass over the codes, now that every feature's max is known.

  Counts every firing at >= ``fraction`` of its feature's maximum by language and by token
  (the population the paper's examples sample), and draws the example set: up to E of those
  sequences per feature uniformly at random (reproducible from ``seed``), each at its maximum.
  ``values``/``indices`` [N, k] are the codes of the N tokens (``token``, ``lang``, ``seq``,
  ``pos``: [N]) the stats were built from.
  """
  m, vocab, e = stats.d_sae, stats.vocab, stats.ex_val.shape[1]
  strong_lang = np.zeros((N_LANGUAGE_CODES, m), np.int64)
  keys, cand = [], []
  for lo in range(0, values.shape[0], chunk):
    v, i = values[lo:lo + chunk], indices[lo:lo + chunk].astype(np.int64)
    hit = (v > 0) & (v >= fraction * stats.act_max[i])
    rows = np.nonzero(hit)[0] + lo
    f = i[hit]
    lr = np.clip(lang[rows].astype(np.int64), 0, N_LANGUAGE_CODES - 1)
    strong_lang += np.bincount(lr * m + f, minlength=N_LANGUAGE_CODES * m).reshape(
        N_LANGUAGE_CODES, m)
    keys.append(f * vocab + token[rows].astype(np.int64))
    cand.append((f, seq[rows].astype(np.int64), v[hit], pos[rows]))
  uniq, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                           return_counts=True)
  stats.strong_lang, stats.strong_keys, stats.strong_counts = strong_lang, uniq, counts
  f, s, v, p = (np.concatenate([c[j] for c in cand]) if cand else np.zeros(0)
                for j in range(4))
  f, s = f.astype(np.int64), s.astype(np.int64)
  order = np.lexsort((-v, s, f))  # each (feature, sequence) once, at its maximum
  f, s, v, p = f[order], s[order], v[order], p[order]
  first = np.ones(f.size, bool)
  first[1:] = (f[1:] != f[:-1]) | (s[1:] != s[:-1])
  f, s, v, p = f[first], s[first], v[first], p[first]
  prio = _mix(_mix(s + (np.int64(seed) << 40)) ^ f.astype(np.uint64))
  order = np.lexsort((prio, f))
  f, s, v, p = f[order], s[order], v[order], p[order]
  rank = np.arange(f.size) - np.searchsorted(f, f, side="left")
  keep = rank < e
  stats.sample_val = np.full((m, e), -np.inf, np.float32)
  stats.sample_seq = np.zeros((m, e), np.int64)
  stats.sample_pos = np.zeros((m, e), np.int32)
  stats.sample_val[f[keep], rank[keep]] = v[keep]
  stats.sample_seq[f[keep], rank[keep]] = s[keep]
  stats.sample_pos[f[keep], rank[keep]] = p[keep]
