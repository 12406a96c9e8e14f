"""What each checkpoint's features are, and how they carry over training (reads the run store).

    report = sj.analysis.analyze(workdir)          # tables, plots, report.html
    m = sj.analysis.match_decoders(sae_a, sae_b)   # decoder-direction matching
    m = sj.analysis.match_activations(codes_a, codes_b)   # activation-correlation matching
    sj.analysis.find_merges(codes_a, codes_b, m, d_a, d_b, threshold)   # merges and splits

Computation (typed results): stats, codes, labels, describe, matching, merges, lineage. Presentation
of those results: tables, plots, report. analyze ties them together over a workdir.
"""

from sae_jax.analysis.analyze import analyze
from sae_jax.analysis.codes import feature_stats, feature_stats_many
from sae_jax.analysis.config import AnalysisConfig, MatchConfig
from sae_jax.analysis.describe import SAEFeatures, describe_sae
from sae_jax.analysis.evalset import EvalSet, build_eval_set
from sae_jax.analysis.examples import Example, FeatureExamples, read_examples
from sae_jax.analysis.granularity import GranularityConfig
from sae_jax.analysis.labels import (ExampleLabels, FeatureLabels, LabelConfig,
                                     granularity_labels, label_examples, label_features,
                                     language_labels)
from sae_jax.analysis.lexicon import Lexicon, load_lexicon, script_of, toy_lexicon
from sae_jax.analysis.lineage import Comparison, Lineage, OverlapResult, analyze_overlap
from sae_jax.analysis.matching import (Matching, assign_one_to_one, match_activations,
                                       match_decoders)
from sae_jax.analysis.merges import Merge, find_merges
from sae_jax.analysis.stats import (FeatureStats, StatsAccumulator, collect_stats,
                                    collect_stats_many)

__all__ = ["AnalysisConfig", "Comparison", "EvalSet", "Example", "ExampleLabels",
           "FeatureExamples", "FeatureLabels", "FeatureStats", "GranularityConfig", "LabelConfig",
           "Lexicon", "Lineage", "MatchConfig", "Matching", "OverlapResult", "SAEFeatures",
           "Merge", "StatsAccumulator", "analyze", "analyze_overlap", "assign_one_to_one", "build_eval_set", "collect_stats",
           "collect_stats_many", "describe_sae", "feature_stats", "find_merges", "feature_stats_many",
           "granularity_labels", "label_examples", "label_features", "language_labels",
           "load_lexicon", "match_activations", "match_decoders", "read_examples", "script_of",
           "toy_lexicon"]
