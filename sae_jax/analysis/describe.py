"""What the analysis finds about one SAE's features: labels, the random sample, top tokens.

Pure computation over :class:`FeatureStats` and the evaluation set; the tables, plots and the
report (tables.py, plots.py, report.py) present the :class:`SAEFeatures` it returns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_jax.analysis.config import AnalysisConfig
from sae_jax.analysis.evalset import EvalSet
from sae_jax.analysis.labels import FeatureLabels, label_features
from sae_jax.analysis.lexicon import Lexicon, clean_token
from sae_jax.analysis.stats import FeatureStats
from sae_jax.languages import N_LANGUAGE_CODES
from sae_jax.store import SAERecord

TOP_TOKENS = 5  # tokens kept per feature (table column, report card)


@dataclasses.dataclass
class SAEFeatures:
  """One SAE of the store and what its features are over the evaluation set.

  Attributes:
    record: the SAE (checkpoint, hook, seed, directory). stats: its feature statistics.
    labels: language and granularity label arrays [M].
    sample: sorted ids of the random sample of live features (reproducible from the sample
      seed and the SAE's seed).
    top_tokens: live feature -> up to TOP_TOKENS (token text, share of its firings), most
      frequent first.
    language_frequency: [N_LANGUAGE_CODES, M] firings on tokens of a language code / tokens of
      that code in the evaluation set.
  """

  record: SAERecord
  stats: FeatureStats
  labels: FeatureLabels
  sample: np.ndarray
  top_tokens: dict[int, list[tuple[str, float]]]
  language_frequency: np.ndarray

  @property
  def live(self) -> np.ndarray:
    """Ids of the features that fired, ascending."""
    return np.nonzero(self.stats.live)[0]


def top_tokens(stats: FeatureStats, feature: int, token_text: list[str], n: int = TOP_TOKENS
               ) -> list[tuple[str, float]]:
  """The feature's ``n`` most frequent firing tokens: (clean text, share of its firings)."""
  toks, counts = stats.token_counts(feature)
  total = max(int(stats.count[feature]), 1)
  return [(clean_token(token_text[t]) or token_text[t], round(float(c) / total, 3))
          for t, c in zip(toks[:n], counts[:n])]


def sample_live(stats: FeatureStats, size: int, seed: int, sae_seed: int = 0) -> np.ndarray:
  """Sorted ids of ``size`` live features drawn without replacement (all, if fewer)."""
  live = np.nonzero(stats.live)[0]
  rng = np.random.default_rng([seed, sae_seed])
  return np.sort(rng.choice(live, size=min(size, live.size), replace=False))


def describe_sae(record: SAERecord, stats: FeatureStats, evalset: EvalSet,
                 lexicon: Lexicon | None, cfg: AnalysisConfig) -> SAEFeatures:
  """Labels (the paper's rules on the paper's examples where ``stats`` carries them), the
  random sample, top tokens and per-language frequencies of one SAE."""
  labels = label_features(stats, evalset.ids, evalset.token_text, evalset.language, lexicon,
                          cfg.labels, evalset.mask)
  codes = np.clip(evalset.language[evalset.mask].astype(np.int64), 0, N_LANGUAGE_CODES - 1)
  lang_tokens = np.bincount(codes, minlength=N_LANGUAGE_CODES)
  return SAEFeatures(
      record, stats, labels,
      sample_live(stats, cfg.sample_size, cfg.sample_seed, record.seed),
      {int(f): top_tokens(stats, int(f), evalset.token_text) for f in np.nonzero(stats.live)[0]},
      stats.lang_count / np.maximum(lang_tokens, 1)[:, None])
