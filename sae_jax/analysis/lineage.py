"""Feature overlap and lineage over training time, from the matchings of matching.py.

For every hook of a trace (its seed-0 SAEs in training order):

* seed baseline: a checkpoint's SAE against its seed variants (the same activations, another
  init seed): how much two runs share at all, the yardstick for the curves below;
* transitions: each checkpoint against the next one, and against the final one;
* lineage: every live feature of the final SAE walked back through the one-to-one assignments
  of consecutive checkpoints while the match scores >= the threshold; where the walk stops is
  the feature's birth.

Pure computation: the codes come through ``codes_of``; the results are the typed
:class:`OverlapResult` (tables.py and report.py present it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from sae_jax import console
from sae_jax.analysis.labels import (LANGUAGE_LABELS, LANGUAGE_SPECIFIC, LEXICON_GRANULARITIES,
                                     FeatureLabels)
from sae_jax.analysis.matching import Matching, match_activations, match_decoders
from sae_jax.store import SAERecord

THRESHOLD = 0.5  # a match scoring at least this is the same feature
LINKS_PER_FEATURE = 4  # matches shown per feature card
# The labels overlap is broken down by: decided languages, and the granularities with a lexicon.
BY_LANGUAGE = tuple(x for x in LANGUAGE_LABELS if x not in ("none", "dead"))
BY_GRANULARITY = LEXICON_GRANULARITIES

Codes = tuple[np.ndarray, np.ndarray]  # (values [N, k], indices [N, k]) over the evaluation set


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Of SAE ``a``'s live features, the share whose one-to-one match in SAE ``b`` scores >= the
  threshold (an ``overlap``); one row of overlap.csv.

  kind: "seed" (b: a seed variant of a's checkpoint, named by its key), "next" (b: the next
  checkpoint), "final" (b: the final checkpoint). overlap_decoder: the same by decoder
  directions (None: not measured). mean_best: mean best-partner correlation.
  overlap_language / overlap_granularity: the overlap among the features of each label.
  """

  hook: str
  kind: str
  a: str
  b: str
  step: int | None
  overlap: float
  overlap_decoder: float | None
  mean_best: float
  overlap_language: dict[str, float] = dataclasses.field(default_factory=dict)
  overlap_granularity: dict[str, float] = dataclasses.field(default_factory=dict)


class Link(NamedTuple):
  """A matched feature of a neighbouring checkpoint (a list [sae, feature, score] in JSON)."""

  sae: str  # the SAE record's key
  feature: int
  score: float


@dataclasses.dataclass(frozen=True)
class Lineage:
  """A live feature of a hook's final SAE and its chain of predecessors.

  chain: feature ids, the final one first, then one per earlier checkpoint. birth: the
  checkpoint of the chain's oldest feature. language_specific_ancestor: a predecessor was
  labelled with one language.
  """

  hook: str
  feature: int
  birth: str
  birth_step: int | None
  chain: tuple[int, ...]
  language: str
  granularity: str
  language_specific_ancestor: bool


@dataclasses.dataclass
class OverlapResult:
  """Everything the overlap analysis found; links: {SAE key: {feature: up to
  LINKS_PER_FEATURE matched features of the neighbouring checkpoints}}."""

  threshold: float
  comparisons: list[Comparison]
  lineages: list[Lineage]
  links: dict[str, dict[int, list[Link]]]
  checkpoints: list[str]  # of the seed-0 SAEs, in training order (births are among them)


def analyze_overlap(records: list[SAERecord], saes: dict, codes_of: Callable[[SAERecord], Codes],
                    labels: dict[str, FeatureLabels], threshold: float = THRESHOLD,
                    log_fn: Callable[[str], None] = print) -> OverlapResult:
  """Seed baseline, transitions and lineage of every hook of ``records`` (training order).

  ``saes``: {record key: SAE}; ``codes_of(record)``: its codes over the evaluation set;
  ``labels``: {record key: its features' labels}.
  """
  comparisons, lineages, links = [], [], {}
  for hook in dict.fromkeys(r.hook for r in records):
    base = [r for r in records if r.hook == hook and r.seed == 0]
    if not base:
      continue
    codes = {r.key: codes_of(r) for r in base}
    variants = [r for r in records if r.hook == hook and r.seed]
    comparisons += _seed_comparisons(base, variants, saes, codes, codes_of, labels, threshold)
    matches, found = _transitions(base, saes, codes, labels, threshold, log_fn)
    comparisons += found
    back = _predecessors(base, matches, saes)
    for f in np.nonzero(labels[base[-1].key].language != "dead")[0]:
      lineages.append(_walk_back(int(f), base, back, labels, threshold, links))
  return OverlapResult(threshold, comparisons, lineages,
                       {k: {f: v[:LINKS_PER_FEATURE] for f, v in d.items()}
                        for k, d in links.items()},
                       list(dict.fromkeys(r.checkpoint for r in records if r.seed == 0)))


def _live_overlap(m: Matching, live: np.ndarray, threshold: float) -> tuple[float, float]:
  """(overlap, mean best score) among the live features."""
  return (m.overlap(threshold, live),
          float(m.best_score[live].mean()) if live.any() else np.nan)


def _seed_comparisons(base, variants, saes, codes, codes_of, labels, threshold
                      ) -> list[Comparison]:
  """Every seed-0 SAE against the seed variants of its checkpoint."""
  out = []
  for r in base:
    for v in [v for v in variants if v.checkpoint == r.checkpoint]:
      m = match_activations(codes[r.key], codes_of(v), saes[r.key].cfg.d_sae,
                            saes[v.key].cfg.d_sae)
      md = match_decoders(saes[r.key], saes[v.key])
      live = labels[r.key].language != "dead"
      overlap, mean_best = _live_overlap(m, live, threshold)
      out.append(Comparison(r.hook, "seed", r.checkpoint, v.key, r.step, overlap,
                            md.overlap(threshold, live), mean_best))
  return out


def _transitions(base, saes, codes, labels, threshold, log_fn
                 ) -> tuple[dict[tuple[str, str], Matching], list[Comparison]]:
  """Each checkpoint against the next and the final one: ({(key a, key b): Matching},
  comparisons); the consecutive matchings are what the lineage walks."""
  matches, out = {}, []
  final = base[-1]
  for i, r in enumerate(base[:-1]):
    lab = labels[r.key]
    live = lab.language != "dead"
    for other, kind in ((base[i + 1], "next"), (final, "final")):
      if (r.key, other.key) not in matches:  # "final" is "next" for the last transition
        matches[(r.key, other.key)] = match_activations(
            codes[r.key], codes[other.key], saes[r.key].cfg.d_sae, saes[other.key].cfg.d_sae,
            log_fn=log_fn)
      m = matches[(r.key, other.key)]
      overlap, mean_best = _live_overlap(m, live, threshold)
      decoder = (match_decoders(saes[r.key], saes[other.key]).overlap(threshold, live)
                 if kind == "next" else None)  # decoders only share a basis nearby
      out.append(Comparison(
          r.hook, kind, r.checkpoint, other.checkpoint, r.step, overlap, decoder, mean_best,
          {x: m.overlap(threshold, lab.language == x) for x in BY_LANGUAGE},
          {x: m.overlap(threshold, lab.granularity == x) for x in BY_GRANULARITY}))
    console.live(log_fn)(f"overlap {r.hook}: {r.checkpoint} matched")
  return matches, out


def _predecessors(base, matches, saes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{key of each newer SAE: (predecessor [M] (-1: none), its score [M])}: the consecutive
  one-to-one assignments (older -> newer) read in reverse."""
  back = {}
  for older, newer in zip(base[:-1], base[1:]):
    m = matches[(older.key, newer.key)]
    pred = np.full(saes[newer.key].cfg.d_sae, -1, np.int64)
    pred_score = np.zeros(saes[newer.key].cfg.d_sae, np.float32)
    hit = np.nonzero(m.assignment >= 0)[0]
    pred[m.assignment[hit]] = hit
    pred_score[m.assignment[hit]] = m.assignment_score[hit]
    back[newer.key] = (pred, pred_score)
  return back


def _walk_back(f: int, base, back, labels, threshold, links: dict) -> Lineage:
  """Feature ``f`` of the final SAE back through its predecessors; records each link met in
  ``links`` (both directions)."""
  chain, cur, birth = [f], f, base[-1].checkpoint
  ancestor_specific = False
  for i in range(len(base) - 1, 0, -1):
    pred, pred_score = back[base[i].key]
    part, score = int(pred[cur]), float(pred_score[cur])
    if part < 0 or score < threshold:
      break
    cur, birth = part, base[i - 1].checkpoint
    chain.append(cur)
    if labels[base[i - 1].key].language[cur] in LANGUAGE_SPECIFIC:
      ancestor_specific = True
    links.setdefault(base[i].key, {}).setdefault(chain[-2], []).append(
        Link(base[i - 1].key, cur, round(score, 3)))
    links.setdefault(base[i - 1].key, {}).setdefault(cur, []).append(
        Link(base[i].key, chain[-2], round(score, 3)))
  final = labels[base[-1].key]
  return Lineage(base[-1].hook, f, birth, next(r.step for r in base if r.checkpoint == birth),
                 tuple(chain), final.language[f], final.granularity[f], ancestor_specific)
