"""What the analysis computes: :class:`AnalysisConfig` (the label rules' thresholds: labels.py)."""

from __future__ import annotations

import dataclasses

from sae_jax.analysis.labels import LabelConfig
from sae_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  """How features are matched across SAEs (lineage.py, merges.py).

  Attributes:
    threshold: activation correlation at which two features are the same one; 0: calibrated
      on the seed baselines (the correlation two seeds' features reach against shuffled
      pairings at ``false_match_rate``), ``DEFAULT_THRESHOLD`` where there is no seed baseline.
    false_match_rate: the calibration's false-match rate.
    min_firings: features firing on fewer evaluation tokens are not matched at all (their
      correlations are noise); the overlap is a share of the features that fire this often.
    lineage_gap: weak links a lineage may bridge, each skipping one checkpoint (flagged).
    sweep: thresholds the headline numbers are recomputed at (the sensitivity table).
    merge_min_corr: correlation a part of a merge (split) has with the whole on its own.
    merge_min_gain: explained variance (R^2) each further part must add.
    merge_max_parts: parts considered per merge (split).
  """

  threshold: float = 0.0
  false_match_rate: float = 0.05
  min_firings: int = 5
  lineage_gap: int = 1
  sweep: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  merge_min_corr: float = 0.2
  merge_min_gain: float = 0.1
  merge_max_parts: int = 4

  def __post_init__(self):
    object.__setattr__(self, "sweep", tuple(float(x) for x in self.sweep))
    if not (0 <= self.threshold <= 1 and 0 < self.false_match_rate < 1):
      raise ConfigError(f"threshold={self.threshold} must be in [0, 1] (0: calibrated) and "
                        f"false_match_rate={self.false_match_rate} in (0, 1)")
    if self.min_firings < 1 or self.lineage_gap < 0 or self.merge_max_parts < 2:
      raise ConfigError(f"min_firings={self.min_firings} must be >= 1, lineage_gap="
                        f"{self.lineage_gap} >= 0, merge_max_parts={self.merge_max_parts} >= 2")


DEFAULT_THRESHOLD = 0.5  # the match threshold where no seed baseline calibrates one


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """What the analysis computes.

  Attributes:
    eval_tokens: counted tokens in the evaluation set (the same for every checkpoint).
    seqs_per_batch: evaluation sequences per model forward.
    n_examples: strongest sequences kept per feature (the paper's example set: up to 50).
    sample_size, sample_seed: the random sample of live features summarised beside all of them
      (the paper labelled 100 per checkpoint by hand).
    lexicon: a TSV lexicon file (form, concept, category[, language]); empty: the toy world's
      own lexicon when the model is a toy model, else none (granularity: token vs multi_token).
    labels: thresholds of the label rules.
    browser_features: feature cards per (checkpoint, hook) in the HTML report (the sample and
      the most frequent features).
    contexts_per_feature, context_window: top contexts shown per card, tokens either side.
    overlap: run the overlap / lineage analysis too.
    matching: how features are matched across SAEs (:class:`MatchConfig`).
  """

  eval_tokens: int = 20_000
  seqs_per_batch: int = 64
  n_examples: int = 50
  sample_size: int = 100
  sample_seed: int = 0
  lexicon: str = ""
  labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
  browser_features: int = 300
  contexts_per_feature: int = 5
  context_window: int = 10
  overlap: bool = True
  matching: MatchConfig = dataclasses.field(default_factory=MatchConfig)

  def __post_init__(self):
    if self.eval_tokens < 1 or self.seqs_per_batch < 1 or self.n_examples < 1:
      raise ConfigError("eval_tokens, seqs_per_batch and n_examples must be >= 1 (got "
                        f"{self.eval_tokens}, {self.seqs_per_batch}, {self.n_examples})")
