r"""Analyse a finished (or partly finished) trace: feature statistics, language and granularity
labels, overlap and lineage over checkpoints, tables, plots and the HTML feature browser.

  sae-jax analyze --workdir=runs/toy
  sae-jax analyze --workdir=runs/llmjp --eval_tokens=1000000 --lexicon=lex.tsv

Writes <workdir>/analysis/ (see README "Outputs"); rerunning rewrites it.
"""

from absl import app, flags

from sae_jax import paths
from sae_jax.console import Console
from sae_jax.cli import parse_flags_or_exit, run_main

flags.DEFINE_string("workdir", None, "the trace's output directory", required=True)
flags.DEFINE_integer("eval_tokens", None, "evaluation-set tokens (same for every checkpoint); "
                     "default: the trace's outputs.analysis_eval_tokens")
flags.DEFINE_string("lexicon", None, "TSV form<TAB>concept<TAB>category[<TAB>language]; empty: "
                    "the toy world's own lexicon when the model is a toy model; default: the "
                    "trace's outputs.lexicon")
flags.DEFINE_integer("sample_size", 100, "random sample of live features summarised per SAE")
flags.DEFINE_integer("sample_seed", 0, "seed of that sample and of the example draws")
flags.DEFINE_integer("browser_features", 300, "feature cards per SAE in report.html")
flags.DEFINE_bool("overlap", True, "also match features across checkpoints (lineage)")
flags.DEFINE_float("match_threshold", None, "correlation at which two features are the same; "
                   "0: calibrated on the seed baselines; default: the trace's "
                   "outputs.match_threshold")
flags.DEFINE_float("false_match_rate", None, "the calibration's false-match rate; default: the "
                   "trace's outputs.false_match_rate")
flags.DEFINE_integer("min_firings", None, "features firing on fewer evaluation tokens are not "
                     "matched; default: the trace's outputs.min_firings")
flags.DEFINE_integer("lineage_gap", None, "weak links a lineage may bridge; default: the "
                     "trace's outputs.lineage_gap")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax import store
  paths.check_location(FLAGS.workdir)
  from sae_jax.analysis import analyze
  from sae_jax.trace import analysis_config
  from sae_jax.trace_config import OutputConfig, TraceConfig
  st = store.Store(FLAGS.workdir)
  # Unset flags take the trace's own settings: rerunning the analysis alone redoes the same one.
  traced = (TraceConfig.from_dict(store.read_json(st.trace_config)).outputs
            if st.trace_config.exists() else OutputConfig(analysis_eval_tokens=20_000))
  given = {k: getattr(FLAGS, f) for k, f in (
      ("analysis_eval_tokens", "eval_tokens"), ("lexicon", "lexicon"),
      ("match_threshold", "match_threshold"), ("false_match_rate", "false_match_rate"),
      ("min_firings", "min_firings"), ("lineage_gap", "lineage_gap"))
      if getattr(FLAGS, f) is not None}
  cfg = analysis_config(traced.replace(**given), sample_size=FLAGS.sample_size,
                        sample_seed=FLAGS.sample_seed, browser_features=FLAGS.browser_features,
                        overlap=FLAGS.overlap)
  console = Console()
  written = analyze(FLAGS.workdir, cfg, log_fn=console)
  console(f"report: {written['report.html']}")


def run(argv=None):
  """The console command (``sae-jax analyze``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
