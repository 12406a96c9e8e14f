"""Matching the features of two SAEs (A -> B); what it is used for over a trace: lineage.py.

* ``match_activations(codes_a, codes_b)`` (primary): the Pearson correlation of two features'
  activations over the same evaluation tokens, for *every* (A, B) feature combination,
  computed from the top-k codes as a sparse product (co-activation sums A^T B in blocks of A's
  features; cost tokens x k_a x k_b, memory one [block, M_b] dense block). It works although
  the residual basis moves between checkpoints.
* ``match_decoders(sae_a, sae_b)`` (secondary): cosine similarity of decoder rows, in blocks on
  device keeping the top candidates per row; meaningful between seeds of one checkpoint, nearby
  checkpoints, or warm-started SAEs.

Both return a :class:`Matching`: per A feature its best partner and score, its top
``n_candidates`` partners, whether the best is mutual, and a one-to-one assignment maximising
the total similarity over the candidate matches (a sparse min-cost bipartite matching, LAPJVsp via
SciPy, with an "unmatched" option of score 0 for every feature - never a dense M x M Hungarian).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import console
from sae_jax.errors import DataError


@dataclasses.dataclass
class Matching:
  """A -> B feature matching (arrays over A's features)."""

  best: np.ndarray  # [M_a] best partner in B (-1: none)
  best_score: np.ndarray  # [M_a]
  candidates: np.ndarray  # [M_a, C] top partners, best first (-1 padded)
  candidate_scores: np.ndarray  # [M_a, C]
  mutual: np.ndarray  # [M_a] bool: A's best partner has A as its best partner too
  assignment: np.ndarray  # [M_a] one-to-one partner (-1: unassigned)
  assignment_score: np.ndarray  # [M_a] (0 where unassigned)

  def overlap(self, threshold: float, among: np.ndarray | None = None) -> float:
    """Share of A's features (``among``, a mask) assigned a partner scoring >= threshold."""
    ok = (self.assignment >= 0) & (self.assignment_score >= threshold)
    return float(ok[among].mean()) if among is not None and among.any() else (
        float(ok.mean()) if among is None else float("nan"))


def _as_codes(codes) -> tuple[np.ndarray, np.ndarray]:
  values, indices = (np.asarray(c) for c in codes)
  if values.shape != indices.shape or values.ndim != 2:
    raise DataError(f"codes must be (values, indices) of equal [N, k] shape, got "
                    f"{values.shape} and {indices.shape}")
  return values.astype(np.float32), indices.astype(np.int64)


def _sparse(values: np.ndarray, indices: np.ndarray, m: int):
  import scipy.sparse as sp
  n, k = values.shape
  fire = values > 0
  rows = np.repeat(np.arange(n), k).reshape(n, k)[fire]
  return sp.csr_matrix((values[fire], (rows, indices[fire])), shape=(n, m), dtype=np.float64)


def firing_counts(codes, d_sae: int) -> np.ndarray:
  """[d_sae] tokens each feature fires on (values > 0) in ``codes``."""
  values, indices = _as_codes(codes)
  return np.bincount(indices[values > 0], minlength=d_sae)[:d_sae]


def match_activations(codes_a, codes_b, d_sae_a: int | None = None, d_sae_b: int | None = None,
                      n_candidates: int = 8, block: int = 2048,
                      log_fn: Callable[[str], None] | None = None,
                      min_firings: int = 1) -> Matching:
  """Match features by activation correlation over the same tokens.

  Args:
    codes_a, codes_b: (values [N, k_a], indices [N, k_a]) and (values [N, k_b], indices) of two
      SAEs over the same N tokens (``sae.encode`` output; values <= 0 count as not firing).
    d_sae_a, d_sae_b: latent counts (default: 1 + the largest index seen).
    n_candidates: partners kept per A feature (the assignment's candidates).
    block: A features per dense [block, M_b] co-activation block (memory: 8 * block * M_b B).
    min_firings: features of either SAE firing on fewer tokens are not matched (no partner,
      and no one's partner).
  """
  va, ia = _as_codes(codes_a)
  vb, ib = _as_codes(codes_b)
  if va.shape[0] != vb.shape[0]:
    raise DataError(f"codes cover different tokens: {va.shape[0]} vs {vb.shape[0]} rows")
  n = va.shape[0]
  ma = d_sae_a or int(ia.max(initial=-1)) + 1
  mb = d_sae_b or int(ib.max(initial=-1)) + 1
  if min_firings > 1:
    va, vb = _drop_rare(va, ia, ma, min_firings), _drop_rare(vb, ib, mb, min_firings)
  a, b = _sparse(va, ia, ma), _sparse(vb, ib, mb)
  mean_a, std_a = _moments(a, n)
  mean_b, std_b = _moments(b, n)
  at = a.T.tocsr()
  return _match_blocks(lambda lo, hi: (at[lo:hi] @ b).toarray() / n, mean_a, std_a, mean_b,
                       std_b, n_candidates, block, log_fn, "activation matching")


def _drop_rare(values: np.ndarray, indices: np.ndarray, m: int, min_firings: int
               ) -> np.ndarray:
  """``values`` with the firings of the features firing < min_firings times set to 0."""
  count = np.bincount(indices[values > 0], minlength=m)
  return np.where(count[indices] >= min_firings, values, 0).astype(np.float32)


def _moments(x, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [M], std [M]) of the columns of the sparse [N, M] activations over N tokens."""
  mean = np.asarray(x.sum(0)).ravel() / n
  sq = np.asarray(x.multiply(x).sum(0)).ravel() / n
  return mean, np.sqrt(np.maximum(sq - mean ** 2, 0))


def _match_blocks(co_block, mean_a, std_a, mean_b, std_b, n_candidates, block, log_fn, what
                  ) -> Matching:
  """Correlations [block, M_b] from ``co_block(lo, hi)`` (E[a_i b_j] of A features lo..hi)
  and the moments; the top candidates per A feature, B's best for mutuality."""
  ma, mb = mean_a.shape[0], mean_b.shape[0]
  c = min(n_candidates, mb)
  cand = np.full((ma, c), -1, np.int64)
  cand_s = np.full((ma, c), -np.inf, np.float32)
  best_b = np.full(mb, -np.inf, np.float32)  # B's best score, for mutuality
  best_b_arg = np.full(mb, -1, np.int64)
  inv_b = np.where(std_b > 0, 1 / np.maximum(std_b, 1e-30), 0)
  t0 = last = time.perf_counter()
  for lo in range(0, ma, block):
    hi = min(lo + block, ma)
    co = co_block(lo, hi)
    corr = (co - np.outer(mean_a[lo:hi], mean_b)) * inv_b[None, :]
    corr *= np.where(std_a[lo:hi] > 0, 1 / np.maximum(std_a[lo:hi], 1e-30), 0)[:, None]
    corr = corr.astype(np.float32)
    top = np.argpartition(-corr, c - 1, axis=1)[:, :c] if c < mb else np.tile(
        np.arange(mb), (hi - lo, 1))
    top_s = np.take_along_axis(corr, top, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    cand[lo:hi] = np.take_along_axis(top, order, 1)
    cand_s[lo:hi] = np.take_along_axis(top_s, order, 1)
    col_best = corr.max(0)
    better = col_best > best_b
    best_b_arg[better] = lo + corr.argmax(0)[better]
    best_b[better] = col_best[better]
    if log_fn is not None and time.perf_counter() - last > 10:  # only a long match reports
      last = time.perf_counter()
      console.live(log_fn)(f"{what}: {hi:,}/{ma:,} features ({last - t0:.0f}s)")
  return _finish(cand, cand_s, best_b_arg, std_a > 0)


def token_profile_match(codes_a, codes_b, tokens: np.ndarray, d_sae_a: int, d_sae_b: int,
                        n_candidates: int = 8, block: int = 2048,
                        min_firings: int = 1) -> Matching:
  """The matching token identity alone predicts (the token-identity null).

  Each feature's activation is split into its mean on each token (``tokens`` [N]: the token id
  of every row of the codes) - what its top-token distribution predicts - and the rest. The
  score of a pair is the part of their correlation the token means carry: the covariance of
  the two predictions over the N tokens divided by the features' own standard deviations (for
  two detectors of one token that fire whenever it occurs it is their correlation; for
  features that token identity does not predict it is near 0). Features are then matched on
  it exactly as :func:`match_activations` matches the activations.
  """
  import scipy.sparse as sp
  tokens = np.asarray(tokens).astype(np.int64)
  va, ia = _as_codes(codes_a)
  vb, ib = _as_codes(codes_b)
  if not (va.shape[0] == vb.shape[0] == tokens.shape[0]):
    raise DataError(f"codes and tokens cover different rows: {va.shape[0]}, {vb.shape[0]}, "
                    f"{tokens.shape[0]}")
  n = tokens.shape[0]
  vocab, inv = np.unique(tokens, return_inverse=True)
  occ = np.bincount(inv, minlength=vocab.size).astype(np.float64)
  p = occ / n

  def profile(v, i, m):  # ([V, M] mean activation of each feature on each token, std [M])
    if min_firings > 1:
      v = _drop_rare(v, i, m, min_firings)
    x = _sparse(v, i, m)
    _, std = _moments(x, n)
    x = x.tocoo()
    prof = sp.csr_matrix((x.data, (inv[x.row], x.col)), shape=(vocab.size, m))
    return sp.diags(1 / occ) @ prof, std

  (pa, std_a), (pb, std_b) = profile(va, ia, d_sae_a), profile(vb, ib, d_sae_b)
  # The predictions' means are the features' means: sums over the vocabulary weighted by p.
  mean_a, mean_b = np.asarray(pa.T @ p).ravel(), np.asarray(pb.T @ p).ravel()
  pat = (sp.diags(p) @ pa).T.tocsr()
  return _match_blocks(lambda lo, hi: (pat[lo:hi] @ pb).toarray(), mean_a, std_a, mean_b, std_b,
                       n_candidates, block, None, "token-profile matching")


def shuffled(codes, shift: int | None = None, seed: int = 0):
  """The codes with their rows rolled by ``shift`` (default: a random shift near half of the
  rows): the same features with the same firing statistics, paired with other tokens."""
  values, indices = _as_codes(codes)
  n = values.shape[0]
  if shift is None:
    shift = int(np.random.default_rng(seed).integers(n // 4, max(3 * n // 4, n // 4 + 1)))
  return np.roll(values, shift, 0), np.roll(indices, shift, 0)


def calibrate_threshold(null_scores: np.ndarray, false_match_rate: float) -> float:
  """The smallest correlation t at which at most ``false_match_rate`` of the features are
  matched at >= t by chance: ``null_scores`` are the one-to-one assignment scores (0 where
  unassigned) of the eligible features of seed pairs matched against shuffled pairings."""
  s = np.sort(np.asarray(null_scores, np.float64))[::-1]
  if s.size == 0:
    return float("nan")
  allowed = int(np.floor(false_match_rate * s.size))  # chance matches allowed
  # Just above the (allowed + 1)-th largest chance score: only `allowed` reach the threshold
  # (the next float32: scores are float32, and a Python float is compared as one).
  t = np.float32(s[allowed] if allowed < s.size else 0.0)
  return float(min(max(np.nextafter(t, np.float32(np.inf)), 0.0), 1.0))


def pair_correlations(codes, pairs: np.ndarray, d_sae: int, chunk_nnz: int = 20_000_000
                      ) -> np.ndarray:
  """Activation correlation of the feature pairs ``pairs`` [P, 2] of one SAE over its codes'
  tokens (sparse column products, in chunks of at most ``chunk_nnz`` stored firings)."""
  values, indices = _as_codes(codes)
  n = values.shape[0]
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  out = np.zeros(pairs.shape[0], np.float64)
  if pairs.size == 0:
    return out
  x = _sparse(values, indices, d_sae)
  mean, std = _moments(x, n)
  xt = x.T.tocsr()
  nnz = np.diff(xt.indptr)
  cost = np.cumsum(nnz[pairs[:, 0]] + nnz[pairs[:, 1]])
  lo = 0
  while lo < pairs.shape[0]:
    hi = max(int(np.searchsorted(cost, cost[lo] - (nnz[pairs[lo, 0]] + nnz[pairs[lo, 1]])
                                 + chunk_nnz, side="right")), lo + 1)
    p = pairs[lo:hi]
    out[lo:hi] = np.asarray(xt[p[:, 0]].multiply(xt[p[:, 1]]).sum(1)).ravel() / n
    lo = hi
  denom = std[pairs[:, 0]] * std[pairs[:, 1]]
  cov = out - mean[pairs[:, 0]] * mean[pairs[:, 1]]
  return np.where(denom > 0, cov / np.maximum(denom, 1e-30), 0.0)


def match_decoders(sae_a, sae_b, n_candidates: int = 8, block: int = 4096) -> Matching:
  """Match features by decoder-row cosine similarity (rows compared in blocks on device)."""
  da, db = np.asarray(sae_a.params["W_dec"]), np.asarray(sae_b.params["W_dec"])
  if da.shape[1] != db.shape[1]:
    raise DataError(f"decoders live in different spaces: d_in {da.shape[1]} vs {db.shape[1]}")
  unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  da, db = jnp.asarray(unit(da)), jnp.asarray(unit(db))
  c = min(n_candidates, db.shape[0])

  @jax.jit
  def block_top(rows):
    sims = rows @ db.T
    return jax.lax.top_k(sims, c), sims.max(0), sims.argmax(0)

  ma, mb = da.shape[0], db.shape[0]
  cand = np.zeros((ma, c), np.int64)
  cand_s = np.zeros((ma, c), np.float32)
  best_b = np.full(mb, -np.inf, np.float32)
  best_b_arg = np.full(mb, -1, np.int64)
  for lo in range(0, ma, block):
    rows = da[lo:lo + block]
    (s, i), col_best, col_arg = block_top(rows)
    cand[lo:lo + rows.shape[0]] = np.asarray(i)
    cand_s[lo:lo + rows.shape[0]] = np.asarray(s)
    col_best, col_arg = np.asarray(col_best), np.asarray(col_arg)
    better = col_best > best_b
    best_b_arg[better] = lo + col_arg[better]
    best_b[better] = col_best[better]
  return _finish(cand, cand_s, best_b_arg, np.ones(ma, bool))


def _finish(cand, cand_s, best_b_arg, valid_a) -> Matching:
  best = np.where(valid_a, cand[:, 0], -1)
  best_s = np.where(valid_a, cand_s[:, 0], 0).astype(np.float32)
  mutual = (best >= 0) & (best_b_arg[np.maximum(best, 0)] == np.arange(len(best)))
  assign, assign_s = assign_one_to_one(cand, cand_s, valid_a)
  return Matching(best, best_s, cand, cand_s, mutual, assign, assign_s)


def assign_one_to_one(cand: np.ndarray, cand_s: np.ndarray, valid: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One-to-one assignment over candidate matches maximising total score (unmatched scores 0).

  A sparse bipartite graph (A features x (B features + one private "unmatched" node per A
  feature)) solved by SciPy's min-weight full bipartite matching (LAPJVsp); only candidates
  with positive score are edges.
  """
  import scipy.sparse as sp
  from scipy.sparse.csgraph import min_weight_full_bipartite_matching
  ma, c = cand.shape
  mb = int(cand.max(initial=-1)) + 1
  ok = (cand >= 0) & np.isfinite(cand_s) & (cand_s > 0)
  if valid is not None:
    ok &= valid[:, None]
  rows = np.concatenate([np.nonzero(ok)[0], np.arange(ma)])
  cols = np.concatenate([cand[ok], mb + np.arange(ma)])
  # cost = 2 - score (> 0 so SciPy keeps the edge); unmatched costs 2 (score 0).
  cost = np.concatenate([2.0 - cand_s[ok].astype(np.float64), np.full(ma, 2.0)])
  graph = sp.csr_matrix((cost, (rows, cols)), shape=(ma, mb + ma))
  _, col = min_weight_full_bipartite_matching(graph)
  assign = np.where(col < mb, col, -1).astype(np.int64)
  score = np.zeros(ma, np.float32)
  hit = assign >= 0
  lookup = {(int(r), int(cc)): float(s) for r, cc, s in zip(np.nonzero(ok)[0], cand[ok],
                                                            cand_s[ok])}
  score[hit] = [lookup[(int(r), int(assign[r]))] for r in np.nonzero(hit)[0]]
  return assign, score
