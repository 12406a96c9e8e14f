"""The overlap analysis's results (lineage.py computes them; tables.py and report.py present
them): one typed record per row of overlap.csv, lineage.csv, merges.csv, nulls.csv and the
calibration, gathered in :class:`OverlapResult`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from sae_jax.analysis.labels import LANGUAGE_LABELS, LEXICON_GRANULARITIES

# The labels overlap is broken down by: decided languages, and the granularities with a lexicon.
BY_LANGUAGE = tuple(x for x in LANGUAGE_LABELS if x not in ("none", "dead"))
BY_GRANULARITY = LEXICON_GRANULARITIES

Codes = tuple[np.ndarray, np.ndarray]  # (values [N, k], indices [N, k]) over the evaluation set


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Of SAE ``a``'s eligible features (firing >= min_firings), the share whose one-to-one
  match in SAE ``b`` scores >= the threshold (an ``overlap``); one row of overlap.csv.

  kind: "seed" (b: a seed variant of a's checkpoint, named by its key), "next" (b: the next
  checkpoint), "final" (b: the final checkpoint). overlap_decoder: the same by decoder
  directions (None: not measured). mean_best: mean best-partner correlation.
  overlap_language / overlap_granularity: the overlap among the features of each label.
  seed_baseline: the seed pair's overlap at a's checkpoint (None: no seed variant there);
  overlap_vs_seed: overlap / seed_baseline.
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
  seed_baseline: float | None = None
  overlap_vs_seed: float | None = None


class Link(NamedTuple):
  """A matched feature of a neighbouring checkpoint (a list [sae, feature, score, kind] in
  JSON); kind: "match", "gap" (a lineage link over one skipped checkpoint), "merge", "split"."""

  sae: str  # the SAE record's key
  feature: int
  score: float
  kind: str = "match"


@dataclasses.dataclass(frozen=True)
class Lineage:
  """An eligible feature of a hook's final SAE and its chain of predecessors.

  chain: feature ids, the final one first, then one per earlier checkpoint (-1: a checkpoint
  bridged by a gap). birth: the checkpoint of the chain's oldest feature. gaps: weak links
  bridged. language_specific_ancestor: a predecessor was labelled with one language;
  ancestor_expected: the chance of that from the label mix of the predecessors' checkpoints
  alone (1 - prod over them of (1 - their share of language-specific features)).
  """

  hook: str
  feature: int
  birth: str
  birth_step: int | None
  chain: tuple[int, ...]
  language: str
  granularity: str
  language_specific_ancestor: bool
  gaps: int = 0
  ancestor_expected: float = 0.0


@dataclasses.dataclass(frozen=True)
class MergeRow:
  """One merge or split between consecutive checkpoints (a row of merges.csv)."""

  hook: str
  checkpoint_from: str
  checkpoint_to: str
  kind: str
  features_from: tuple[int, ...]
  features_to: tuple[int, ...]
  languages_from: tuple[str, ...]
  languages_to: tuple[str, ...]
  score: float
  best_single: float


@dataclasses.dataclass(frozen=True)
class NullRow:
  """The overlap a null predicts for one comparison (a row of nulls.csv).

  null: "random_model" (``checkpoint``'s SAE against the SAE of the randomly initialised
  model, ``compared_to``) or "token_identity" (the comparison ``kind`` of ``checkpoint`` to
  ``compared_to``, matched by what each feature's token distribution predicts). observed: the
  overlap actually measured (token_identity: for the same pair; random_model: ``checkpoint``
  against the final one, and the seed baseline for the final one; None where not measured)."""

  null: str
  hook: str
  kind: str
  checkpoint: str
  compared_to: str
  overlap: float
  observed: float | None


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The threshold one seed pair gives at the false-match rate (a row of the report)."""

  hook: str
  checkpoint: str
  variant: str
  n_features: int
  threshold: float
  seed_overlap: float  # the pair's overlap at the threshold in use


@dataclasses.dataclass
class OverlapResult:
  """Everything the overlap analysis found; links: {SAE key: {feature: up to
  LINKS_PER_FEATURE matched features of the neighbouring checkpoints}}.

  threshold_source: "fixed" (configured), "calibrated" (on the seed pairs, pooled) or
  "default" (no seed pair to calibrate on). sweep: one dict per threshold of the headline
  numbers (tables.sweep_table). ancestor: per hook, the bilingual final features' observed and
  expected shares of a language-specific ancestor.
  """

  threshold: float
  comparisons: list[Comparison]
  lineages: list[Lineage]
  links: dict[str, dict[int, list[Link]]]
  checkpoints: list[str]  # of the seed-0 SAEs, in training order (births are among them)
  threshold_source: str = "fixed"
  false_match_rate: float | None = None
  calibration: list[Calibration] = dataclasses.field(default_factory=list)
  merges: list[MergeRow] = dataclasses.field(default_factory=list)
  nulls: list[NullRow] = dataclasses.field(default_factory=list)
  sweep: list[dict] = dataclasses.field(default_factory=list)
  ancestor: dict[str, dict] = dataclasses.field(default_factory=dict)
