"""What the analysis computes: :class:`AnalysisConfig` (the label rules' thresholds: labels.py)."""

from __future__ import annotations

import dataclasses

from sae_jax.analysis.labels import LabelConfig
from sae_jax.errors import ConfigError


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

  def __post_init__(self):
    if self.eval_tokens < 1 or self.seqs_per_batch < 1 or self.n_examples < 1:
      raise ConfigError("eval_tokens, seqs_per_batch and n_examples must be >= 1 (got "
                        f"{self.eval_tokens}, {self.seqs_per_batch}, {self.n_examples})")
