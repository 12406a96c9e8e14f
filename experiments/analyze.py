r"""Analyse a finished (or partly finished) trace: feature statistics, language and granularity
labels, overlap and lineage over checkpoints, tables, plots and the HTML feature browser.

  python experiments/analyze.py --workdir=runs/toy
  python experiments/analyze.py --workdir=runs/llmjp --eval_tokens=1000000 --lexicon=lex.tsv

Writes <workdir>/analysis/ (see README "Outputs"); rerunning rewrites it.
"""

from absl import app, flags

from sae_jax.cli import parse_flags_or_exit, run_main

flags.DEFINE_string("workdir", None, "the trace's output directory", required=True)
flags.DEFINE_integer("eval_tokens", 20_000, "evaluation-set tokens (same for every checkpoint)")
flags.DEFINE_string("lexicon", "", "TSV form<TAB>concept<TAB>category[<TAB>language]; empty: "
                    "the toy world's own lexicon when the model is a toy model")
flags.DEFINE_integer("sample_size", 100, "random sample of live features summarised per SAE")
flags.DEFINE_integer("sample_seed", 0, "seed of that sample and of the example draws")
flags.DEFINE_integer("browser_features", 300, "feature cards per SAE in report.html")
flags.DEFINE_bool("overlap", True, "also match features across checkpoints (lineage)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax.analysis import AnalysisConfig, analyze
  cfg = AnalysisConfig(eval_tokens=FLAGS.eval_tokens, lexicon=FLAGS.lexicon,
                       sample_size=FLAGS.sample_size, sample_seed=FLAGS.sample_seed,
                       browser_features=FLAGS.browser_features, overlap=FLAGS.overlap)
  written = analyze(FLAGS.workdir, cfg, log_fn=lambda s: print(s, flush=True))
  print(f"report: {written['report.html']}", flush=True)


if __name__ == "__main__":
  app.run(run_main(main), flags_parser=parse_flags_or_exit)
