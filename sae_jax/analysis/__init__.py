"""What each checkpoint's features are, and how they carry over training (reads the run store).

    report = sj.analysis.analyze(workdir)          # tables, plots, report.html
    m = sj.analysis.match_decoders(sae_a, sae_b)   # decoder-direction matching
    m = sj.analysis.match_activations(codes_a, codes_b)   # activation-correlation matching
"""

from sae_jax.analysis.analyze import (AnalysisConfig, analyze, feature_stats,
                                     feature_stats_many, find_pairs)
from sae_jax.analysis.evalset import EvalSet, build_eval_set
from sae_jax.analysis.labels import LabelConfig, granularity_labels, language_labels
from sae_jax.analysis.lexicon import Lexicon, load_lexicon, script_of, toy_lexicon
from sae_jax.analysis.overlap import Matching, assign_one_to_one, match_activations, match_decoders
from sae_jax.analysis.stats import (FeatureStats, StatsAccumulator, collect_stats,
                                   collect_stats_many)

__all__ = ["AnalysisConfig", "EvalSet", "FeatureStats", "LabelConfig", "Lexicon", "Matching",
           "StatsAccumulator", "analyze", "assign_one_to_one", "build_eval_set", "collect_stats",
           "collect_stats_many", "feature_stats", "feature_stats_many",
           "find_pairs", "granularity_labels", "language_labels", "load_lexicon",
           "match_activations", "match_decoders", "script_of", "toy_lexicon"]
