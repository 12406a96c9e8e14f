"""Feature overlap and lineage over training time, from the matchings of matching.py.

For every hook of a trace (its seed-0 SAEs in training order):

* seed baseline: each checkpoint's SAE against its seed variants (the same activations,
  another init seed): how much two runs share at all, the yardstick of the overlap at that
  checkpoint (``overlap_vs_seed``);
* the match threshold: fixed, or calibrated on the seed pairs - the correlation that the seed
  pairs' features reach against shuffled pairings (the variant's codes rolled over the tokens)
  for at most ``false_match_rate`` of them - and a sweep of the headline numbers over
  thresholds;
* transitions: each checkpoint against the next one, and against the final one; merges and
  splits between consecutive checkpoints (merges.py);
* nulls: every checkpoint matched against the SAE of the randomly initialised model (a
  step-0 checkpoint, when traced), and the overlap token identity alone predicts (each
  feature's top-token distribution, ``matching.token_profile_match``);
* lineage: every eligible feature of the final SAE walked back through the one-to-one
  assignments of consecutive checkpoints while the match scores >= the threshold, bridging up
  to ``lineage_gap`` weak links by the assignment two checkpoints back (flagged); where the walk
  stops is the feature's birth. Whether a predecessor is language-specific, beside the chance
  of that from the checkpoints' label mix alone.

Features firing on fewer than ``min_firings`` evaluation tokens are not matched and do not
count in any overlap. Pure computation: the codes come through ``codes_of``; the results are
the typed :class:`OverlapResult` (tables.py and report.py present it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sae_jax import console
from sae_jax.analysis.config import DEFAULT_THRESHOLD, MatchConfig
from sae_jax.analysis.labels import LANGUAGE_SPECIFIC, FeatureLabels
from sae_jax.analysis.matching import (Matching, calibrate_threshold, firing_counts,
                                       match_activations, match_decoders, shuffled,
                                       token_profile_match)
from sae_jax.analysis.merges import find_merges
from sae_jax.analysis.overlap_results import (BY_GRANULARITY, BY_LANGUAGE, Calibration, Codes,
                                              Comparison, Lineage, Link, MergeRow, NullRow,
                                              OverlapResult)
from sae_jax.store import SAERecord

THRESHOLD = DEFAULT_THRESHOLD  # kept for callers: the threshold without a seed baseline
LINKS_PER_FEATURE = 6  # matches (and merges) shown per feature card
__all__ = ["BY_GRANULARITY", "BY_LANGUAGE", "Calibration", "Codes", "Comparison", "Lineage",
           "Link", "MergeRow", "NullRow", "OverlapResult", "analyze_overlap"]


@dataclasses.dataclass
class _Hook:
  """The matchings of one hook (threshold-free: the assignments do not depend on it)."""

  hook: str
  base: list[SAERecord]
  eligible: dict[str, np.ndarray]  # key -> [M] bool (fires >= min_firings)
  seed: list[tuple[SAERecord, SAERecord, Matching, Matching]]  # (r, variant, act, decoder)
  null_scores: list[tuple[SAERecord, SAERecord, np.ndarray]]  # shuffled-pairing scores
  pairs: dict[tuple[str, str], Matching]  # (key a, key b) of seed-0 SAEs
  decoder_next: dict[tuple[str, str], Matching]
  token: dict[tuple[str, str], Matching]  # token-identity null matchings
  random: SAERecord | None  # the randomly initialised model's SAE (step 0), if traced


def analyze_overlap(records: list[SAERecord], saes: dict, codes_of: Callable[[SAERecord], Codes],
                    labels: dict[str, FeatureLabels], threshold: float | None = None,
                    log_fn: Callable[[str], None] = print, cfg: MatchConfig = MatchConfig(),
                    tokens: np.ndarray | None = None) -> OverlapResult:
  """Seed baselines, threshold, transitions, merges, nulls and lineage of every hook of
  ``records`` (training order).

  ``saes``: {record key: SAE}; ``codes_of(record)``: its codes over the evaluation set;
  ``labels``: {record key: its features' labels}; ``threshold``: overrides ``cfg.threshold``;
  ``tokens``: the token id of every row of the codes (the token-identity null; None: no such
  null).
  """
  hooks = []
  codes_cache: dict[str, Codes] = {}

  def codes(r: SAERecord) -> Codes:
    if r.key not in codes_cache:
      codes_cache[r.key] = codes_of(r)
    return codes_cache[r.key]

  for hook in dict.fromkeys(r.hook for r in records):
    base = [r for r in records if r.hook == hook and r.seed == 0]
    if base:
      hooks.append(_match_hook(hook, base, [r for r in records if r.hook == hook and r.seed],
                               saes, codes, labels, cfg, tokens, log_fn))
  fixed = threshold if threshold is not None else cfg.threshold
  pooled = [s for h in hooks for _, _, s in h.null_scores]
  if fixed:
    t, source = float(fixed), "fixed"
  elif pooled:
    t, source = calibrate_threshold(np.concatenate(pooled), cfg.false_match_rate), "calibrated"
    log_fn(f"match threshold calibrated on {len(pooled)} seed pair(s): {t:.3f} (false-match "
           f"rate {cfg.false_match_rate})")
  else:
    t, source = DEFAULT_THRESHOLD, "default"
  result = OverlapResult(t, [], [], {}, list(dict.fromkeys(r.checkpoint for r in records
                                                             if r.seed == 0)),
                         source, cfg.false_match_rate if source == "calibrated" else None)
  links: dict = {}
  for h in hooks:
    result.calibration += [
        Calibration(h.hook, r.checkpoint, v.key, int(s.size),
                    calibrate_threshold(s, cfg.false_match_rate),
                    _share(next(m for r2, v2, m, _ in h.seed if (r2.key, v2.key) ==
                                (r.key, v.key)), h.eligible[r.key], t))
        for r, v, s in h.null_scores]
    t_decoder = t if source == "fixed" else DEFAULT_THRESHOLD
    result.comparisons += _comparisons(h, labels, t, t_decoder)
    result.nulls += _nulls(h, t, result.comparisons)
    lineages = _lineages(h, labels, t, cfg.lineage_gap, links)
    result.lineages += lineages
    result.ancestor[h.hook] = _ancestor_summary(lineages)
    result.merges += _merges(h, codes, saes, labels, t, cfg, links)
  result.links = {k: {f: v[:LINKS_PER_FEATURE] for f, v in d.items()} for k, d in links.items()}
  result.sweep = [_headline(hooks, labels, x, cfg.lineage_gap, x == t)
                  for x in sorted(set(cfg.sweep) | {t})]
  return result


def _share(m: Matching, among: np.ndarray, threshold: float) -> float:
  """Share of the ``among`` features of A matched one-to-one at >= threshold (NaN: none)."""
  return m.overlap(threshold, among) if among.any() else float("nan")


def _match_hook(hook, base, variants, saes, codes, labels, cfg: MatchConfig, tokens, log_fn
                ) -> _Hook:
  """Every matching the hook's results are read from."""
  mf = cfg.min_firings
  d = lambda r: saes[r.key].cfg.d_sae
  eligible = {}
  for r in base + variants:
    eligible[r.key] = (firing_counts(codes(r), d(r)) >= mf) & (labels[r.key].language != "dead")
  act = lambda a, b, ca=None: match_activations(ca if ca is not None else codes(a), codes(b),
                                                d(a), d(b), log_fn=log_fn, min_firings=mf)
  seed, null_scores = [], []
  for r in base:
    for v in [v for v in variants if v.checkpoint == r.checkpoint]:
      seed.append((r, v, act(r, v), match_decoders(saes[r.key], saes[v.key])))
      null = match_activations(codes(r), shuffled(codes(v), seed=len(null_scores)), d(r), d(v),
                               min_firings=mf)
      null_scores.append((r, v, null.assignment_score[eligible[r.key]].astype(np.float64)))
  pairs, decoder_next, token = {}, {}, {}
  final = base[-1]
  random = base[0] if base[0].step == 0 and len(base) > 1 else None
  for i, r in enumerate(base[:-1]):
    wanted = [base[i + 1], final] + ([base[i + 2]] if cfg.lineage_gap and i + 2 < len(base)
                                     else [])
    for other in wanted:
      if (r.key, other.key) not in pairs:
        pairs[(r.key, other.key)] = act(r, other)
    decoder_next[(r.key, base[i + 1].key)] = match_decoders(saes[r.key], saes[base[i + 1].key])
    if tokens is not None:
      for other in (base[i + 1], final):
        if (r.key, other.key) not in token:
          token[(r.key, other.key)] = token_profile_match(codes(r), codes(other), tokens, d(r),
                                                          d(other), min_firings=mf)
    console.live(log_fn)(f"overlap {hook}: {r.checkpoint} matched")
  if random is not None:  # every later checkpoint against the random model's SAE
    for r in base[1:]:
      pairs[(r.key, random.key)] = act(r, random)
  return _Hook(hook, base, eligible, seed, null_scores, pairs, decoder_next, token, random)


def _seed_overlaps(h: _Hook, t: float) -> dict[str, float]:
  """{checkpoint: its seed pairs' mean overlap at threshold t}."""
  by: dict[str, list[float]] = {}
  for r, _, m, _ in h.seed:
    by.setdefault(r.checkpoint, []).append(_share(m, h.eligible[r.key], t))
  return {c: float(np.mean(v)) for c, v in by.items()}


def _comparisons(h: _Hook, labels, t: float, t_decoder: float = DEFAULT_THRESHOLD
                 ) -> list[Comparison]:
  """The seed rows, then each checkpoint against the next and the final one. Decoder cosines
  are thresholded at ``t_decoder`` (the calibration is one of activation correlations)."""
  out = []
  for r, v, m, md in h.seed:
    ok = h.eligible[r.key]
    out.append(Comparison(r.hook, "seed", r.checkpoint, v.key, r.step, _share(m, ok, t),
                          _share(md, ok, t_decoder), _mean_best(m, ok)))
  baseline = _seed_overlaps(h, t)
  final = h.base[-1]
  for i, r in enumerate(h.base[:-1]):
    lab, ok = labels[r.key], h.eligible[r.key]
    for other, kind in ((h.base[i + 1], "next"), (final, "final")):
      m = h.pairs[(r.key, other.key)]
      overlap = _share(m, ok, t)
      dec = h.decoder_next.get((r.key, other.key)) if kind == "next" else None
      seed = baseline.get(r.checkpoint)
      out.append(Comparison(
          r.hook, kind, r.checkpoint, other.checkpoint, r.step, overlap,
          _share(dec, ok, t_decoder) if dec is not None else None, _mean_best(m, ok),
          {x: _share(m, ok & (lab.language == x), t) for x in BY_LANGUAGE},
          {x: _share(m, ok & (lab.granularity == x), t) for x in BY_GRANULARITY},
          seed, overlap / seed if seed else None))
  return out


def _mean_best(m: Matching, ok: np.ndarray) -> float:
  return float(m.best_score[ok].mean()) if ok.any() else float("nan")


def _nulls(h: _Hook, t: float, comparisons: list[Comparison]) -> list[NullRow]:
  """The random-model and token-identity nulls of the hook, beside the observed overlaps."""
  observed = {(c.kind, c.a, c.b): c.overlap for c in comparisons if c.hook == h.hook}
  final = h.base[-1]
  out = []
  if h.random is not None:
    seed_final = _seed_overlaps(h, t).get(final.checkpoint)
    for r in h.base[1:]:
      obs = (observed.get(("final", r.checkpoint, final.checkpoint)) if r is not final
             else seed_final)
      out.append(NullRow("random_model", h.hook, "random", r.checkpoint, h.random.checkpoint,
                         _share(h.pairs[(r.key, h.random.key)], h.eligible[r.key], t), obs))
  by_key = {r.key: r for r in h.base}
  for (a, b), m in h.token.items():
    ra, rb = by_key[a], by_key[b]
    for kind in ("next", "final"):
      if (kind, ra.checkpoint, rb.checkpoint) in observed:
        out.append(NullRow("token_identity", h.hook, kind, ra.checkpoint, rb.checkpoint,
                           _share(m, h.eligible[a], t),
                           observed[(kind, ra.checkpoint, rb.checkpoint)]))
  return out


def _back(h: _Hook, older: SAERecord, newer: SAERecord, saes_d: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """(predecessor [M] (-1: none), its score [M]) of the newer SAE's features: the one-to-one
  assignment older -> newer read in reverse."""
  m = h.pairs[(older.key, newer.key)]
  pred = np.full(saes_d, -1, np.int64)
  score = np.zeros(saes_d, np.float32)
  hit = np.nonzero(m.assignment >= 0)[0]
  pred[m.assignment[hit]] = hit
  score[m.assignment[hit]] = m.assignment_score[hit]
  return pred, score


def _lineages(h: _Hook, labels, t: float, max_gaps: int, links: dict | None) -> list[Lineage]:
  """Every eligible feature of the final SAE walked back (links recorded into ``links``)."""
  base = h.base
  size = lambda r: labels[r.key].language.shape[0]
  back = {i: _back(h, base[i - 1], base[i], size(base[i])) for i in range(1, len(base))}
  skip = {i: _back(h, base[i - 2], base[i], size(base[i])) for i in range(2, len(base))
          if (base[i - 2].key, base[i].key) in h.pairs}
  specific = {r.key: _specific_share(labels[r.key], h.eligible[r.key]) for r in base}
  return [_walk_back(int(f), base, back, skip, labels, specific, t, max_gaps, links)
          for f in np.nonzero(h.eligible[base[-1].key])[0]]


def _specific_share(lab: FeatureLabels, ok: np.ndarray) -> float:
  return float(np.isin(lab.language[ok], LANGUAGE_SPECIFIC).mean()) if ok.any() else 0.0


def _walk_back(f: int, base, back, skip, labels, specific, threshold, max_gaps, links
               ) -> Lineage:
  """Feature ``f`` of the final SAE back through its predecessors, bridging up to
  ``max_gaps`` weak links by the assignment two checkpoints back; records each link met in
  ``links`` (both directions; None: not recorded)."""
  chain, cur, i, gaps = [f], f, len(base) - 1, 0
  ancestor_specific, p_none = False, 1.0
  while i > 0:
    pred, score = back[i]
    part, s, step = int(pred[cur]), float(score[cur]), 1
    if (part < 0 or s < threshold) and gaps < max_gaps and i in skip:
      pred2, score2 = skip[i]
      if int(pred2[cur]) >= 0 and float(score2[cur]) >= threshold:
        part, s, step = int(pred2[cur]), float(score2[cur]), 2
    if part < 0 or s < threshold:
      break
    newer, older = base[i], base[i - step]
    if step == 2:
      gaps += 1
      chain.append(-1)
    chain.append(part)
    if labels[older.key].language[part] in LANGUAGE_SPECIFIC:
      ancestor_specific = True
    p_none *= 1 - specific[older.key]
    if links is not None:
      kind = "gap" if step == 2 else "match"
      links.setdefault(newer.key, {}).setdefault(cur, []).append(
          Link(older.key, part, round(s, 3), kind))
      links.setdefault(older.key, {}).setdefault(part, []).append(
          Link(newer.key, cur, round(s, 3), kind))
    cur, i = part, i - step
  final = labels[base[-1].key]
  birth = base[i]
  return Lineage(birth.hook, f, birth.checkpoint, birth.step, tuple(chain), final.language[f],
                 final.granularity[f], ancestor_specific, gaps, 1 - p_none)


def _ancestor_summary(lineages: list[Lineage]) -> dict:
  """The final bilingual features' share with a language-specific ancestor, and the share
  the label mix alone predicts (the mean of their ancestor_expected)."""
  bil = [x for x in lineages if x.language == "bilingual"]
  with_ancestors = [x for x in bil if len([c for c in x.chain if c >= 0]) > 1]
  return {"bilingual": len(bil), "with_predecessor": len(with_ancestors),
          "observed": (float(np.mean([x.language_specific_ancestor for x in bil]))
                       if bil else float("nan")),
          "expected": float(np.mean([x.ancestor_expected for x in bil])) if bil else float("nan")}


def _merges(h: _Hook, codes, saes, labels, t: float, cfg: MatchConfig, links: dict
            ) -> list[MergeRow]:
  """Merges and splits between consecutive checkpoints (links recorded both ways)."""
  out = []
  for older, newer in zip(h.base[:-1], h.base[1:]):
    m = h.pairs[(older.key, newer.key)]
    found = find_merges(codes(older), codes(newer), m, saes[older.key].cfg.d_sae,
                        saes[newer.key].cfg.d_sae, t, cfg)
    la, lb = labels[older.key].language, labels[newer.key].language
    for x in found:
      out.append(MergeRow(h.hook, older.checkpoint, newer.checkpoint, x.kind, x.features_from,
                          x.features_to, tuple(la[f] for f in x.features_from),
                          tuple(lb[f] for f in x.features_to), round(x.score, 4),
                          round(x.best_single, 4)))
      for a in x.features_from:
        for b in x.features_to:
          links.setdefault(older.key, {}).setdefault(a, []).append(
              Link(newer.key, b, round(x.score, 3), x.kind))
          links.setdefault(newer.key, {}).setdefault(b, []).append(
              Link(older.key, a, round(x.score, 3), x.kind))
  return out


def _headline(hooks: list[_Hook], labels, t: float, max_gaps: int, in_use: bool) -> dict:
  """The headline numbers at threshold t (one row of the sensitivity sweep), over all hooks:
  mean overlap with the next checkpoint (and as a share of the seed baseline), the first
  checkpoint's overlap with the final one, the final seed baseline, the final SAE's overlap
  with the random model's, the share of final features born at the first checkpoint, and the
  bilingual final features' share of a language-specific ancestor (beside its null)."""
  nxt, vs, first, seed_final, rand, born_first, anc, anc_exp = ([] for _ in range(8))
  for h in hooks:
    comps = _comparisons(h, labels, t)
    nxt += [c.overlap for c in comps if c.kind == "next"]
    vs += [c.overlap_vs_seed for c in comps if c.kind == "next" and c.overlap_vs_seed]
    first += [c.overlap for c in comps if c.kind == "final" and c.a == h.base[0].checkpoint]
    seed_final += [c.overlap for c in comps if c.kind == "seed" and c.a == h.base[-1].checkpoint]
    if h.random is not None:
      rand.append(_share(h.pairs[(h.base[-1].key, h.random.key)], h.eligible[h.base[-1].key], t))
    lin = _lineages(h, labels, t, max_gaps, None)
    born_first += [x.birth == h.base[0].checkpoint for x in lin]
    s = _ancestor_summary(lin)
    anc.append(s["observed"])
    anc_exp.append(s["expected"])
  mean = lambda v: float(np.nanmean(v)) if len(v) and not np.all(np.isnan(v)) else float("nan")
  return {"threshold": t, "in_use": bool(in_use), "overlap_next": mean(nxt),
          "overlap_next_vs_seed": mean(vs), "overlap_first_final": mean(first),
          "seed_baseline_final": mean(seed_final), "random_model_final": mean(rand),
          "born_first": mean(born_first), "ancestor_specific_bilingual": mean(anc),
          "ancestor_expected": mean(anc_exp)}
