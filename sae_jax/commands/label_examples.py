r"""Label features from their examples: the paper's language rule (and the script variant) and
the four-class granularity, for any features given in the authors' demo format.

  sae-jax label-examples --input=checkpoint_1000.jsonl.gz --output=labels.csv

Input: one JSON object a line (``.gz``: gzip), ``{"feature", "examples": [{"tokens", "acts"}]}``
(acts quantised 0-10 as the paper does). Output columns: feature, n_en, n_ja, language,
granularity, then language_script and what decided the granularity.
"""

from absl import app, flags

from sae_jax import paths
from sae_jax.cli import parse_flags_or_exit, run_main

flags.DEFINE_string("input", None, "features with examples (.jsonl or .jsonl.gz)", required=True)
flags.DEFINE_string("output", None, "the labels (.csv)", required=True)
flags.DEFINE_string("lexicon", "", "TSV form<TAB>concept<TAB>category[<TAB>language] for the "
                    "concept-level classes (optional)")
FLAGS = flags.FLAGS


def main(argv):
  del argv

  from sae_jax.analysis.analyze import label_examples_file
  paths.check_location(FLAGS.input, "input")
  paths.check_location(FLAGS.output, "output")
  path = label_examples_file(FLAGS.input, FLAGS.output, FLAGS.lexicon)
  print(f"labels: {path}", flush=True)


def run(argv=None):
  """The console command (``sae-jax label-examples``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
