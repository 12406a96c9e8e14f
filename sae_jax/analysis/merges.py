"""Merges and splits between two SAEs over the same tokens (A: checkpoint t, B: t + 1).

A one-to-one assignment cannot say that an English and a Japanese feature became one bilingual
feature: that is a *merge* (several features of A explain one of B), and the reverse is a
*split* (one feature of A is explained by several of B). For every feature ("the whole") the
features of the other SAE that correlate with it on their own (>= ``merge_min_corr``; read from
the matching's candidate lists, so no further pass over all pairs) are its possible parts. The
whole is regressed on its parts by forward selection, each step adding the part that raises the
explained variance R^2 most: a part is kept while it adds >= ``merge_min_gain`` and every
coefficient stays positive (a sum, as a merge is). A whole explained by >= 2 parts with a
multiple correlation R >= the match threshold is a merge (or a split).

The regression needs only correlations: whole-part ones from the matching, part-part ones
(within one SAE) by sparse column products over the codes (``matching.pair_correlations``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_jax.analysis.config import MatchConfig
from sae_jax.analysis.matching import Matching, pair_correlations

KINDS = ("merge", "split")


@dataclasses.dataclass(frozen=True)
class Merge:
  """kind "merge": ``features_from`` (>= 2, of A) became ``features_to`` (one, of B); "split":
  one feature of A became several of B. score: the multiple correlation R of the whole with its
  parts' best positive combination; best_single: the best part's correlation alone."""

  kind: str
  features_from: tuple[int, ...]
  features_to: tuple[int, ...]
  score: float
  best_single: float


def find_merges(codes_a, codes_b, m: Matching, d_sae_a: int, d_sae_b: int, threshold: float,
                cfg: MatchConfig = MatchConfig()) -> list[Merge]:
  """Merges (many of A -> one of B) and splits (one of A -> many of B) from the A -> B
  activation matching ``m`` of the codes (see the module docstring)."""
  ok = (m.candidates >= 0) & np.isfinite(m.candidate_scores) & (
      m.candidate_scores >= cfg.merge_min_corr)
  a_of, slot = np.nonzero(ok)
  b_of, score = m.candidates[ok], m.candidate_scores[ok].astype(np.float64)
  # Merges: the wholes are B's features, their parts the A features listing them.
  order = np.lexsort((-score, b_of))
  merges = _groups(b_of[order], a_of[order], score[order], cfg.merge_max_parts)
  # Splits: the wholes are A's features, their parts their own candidates (best first).
  order = np.lexsort((slot, a_of))
  splits = _groups(a_of[order], b_of[order], score[order], cfg.merge_max_parts)
  out = [Merge("merge", parts, (whole,), r, best)
         for whole, parts, r, best in _explained(merges, codes_a, d_sae_a, threshold, cfg)]
  out += [Merge("split", (whole,), parts, r, best)
          for whole, parts, r, best in _explained(splits, codes_b, d_sae_b, threshold, cfg)]
  return out


def _groups(whole: np.ndarray, part: np.ndarray, score: np.ndarray, max_parts: int
            ) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """[(whole, its parts, their correlations)] for the wholes with >= 2 parts (``whole``
  sorted, the parts of each best first; at most ``max_parts`` kept)."""
  if whole.size == 0:
    return []
  start = np.flatnonzero(np.r_[True, whole[1:] != whole[:-1]])
  end = np.r_[start[1:], whole.size]
  return [(int(whole[s]), part[s:min(e, s + max_parts)], score[s:min(e, s + max_parts)])
          for s, e in zip(start, end) if e - s >= 2]


def _explained(groups, part_codes, d_sae: int, threshold: float, cfg: MatchConfig):
  """Forward selection over each group's parts: [(whole, parts kept, R, best single)] where
  >= 2 parts explain the whole with R >= threshold."""
  if not groups:
    return []
  pairs = np.array([(p[i], p[j]) for _, p, _ in groups for i in range(len(p))
                    for j in range(i + 1, len(p))], np.int64)
  corr = dict(zip(map(tuple, pairs.tolist()), pair_correlations(part_codes, pairs, d_sae)))
  out = []
  for whole, parts, r in groups:
    n = len(parts)
    rxx = np.eye(n)
    for i in range(n):
      for j in range(i + 1, n):
        rxx[i, j] = rxx[j, i] = corr[(int(parts[i]), int(parts[j]))]
    chosen, r2 = [0], float(r[0]) ** 2  # the best part alone
    while len(chosen) < n:
      best = None
      for c in range(n):
        if c in chosen:
          continue
        s = chosen + [c]
        try:
          beta = np.linalg.solve(rxx[np.ix_(s, s)], r[s])
        except np.linalg.LinAlgError:
          continue
        if (beta <= 0).any():
          continue
        fit = float(r[s] @ beta)
        if best is None or fit > best[1]:
          best = (c, fit)
      if best is None or best[1] - r2 < cfg.merge_min_gain:
        break
      chosen.append(best[0])
      r2 = best[1]
    score = float(np.sqrt(max(min(r2, 1.0), 0.0)))
    if len(chosen) >= 2 and score >= threshold:
      out.append((whole, tuple(sorted(int(parts[c]) for c in chosen)), score, float(r[0])))
  return out
