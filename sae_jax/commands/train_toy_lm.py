r"""Train the toy world's target model and write its checkpoints (one directory per revision).

  sae-jax train-toy-lm --workdir=/tmp/toy            # default: ~2 CPU-minutes
  sae-jax train-toy-lm --workdir=/tmp/toy --tiny     # seconds, for a smoke run
"""

from absl import app, flags, logging

from sae_jax.cli import run_main
from sae_jax.toy.lm import TINY_LM, TINY_WORLD, LMConfig, train_toy_lm
from sae_jax.toy.world import WorldConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "where the checkpoints go", required=True)
flags.DEFINE_bool("tiny", False, "the tiny world and model (seconds)")
flags.DEFINE_integer("steps", None, "override the training steps")
flags.DEFINE_integer("seed", 0, "world and model seed")


def main(argv):
  del argv
  world, lm = (TINY_WORLD, TINY_LM) if FLAGS.tiny else (WorldConfig(), LMConfig())
  world = world.__class__(**{**world.__dict__, "seed": FLAGS.seed})
  lm = lm.__class__(**{**lm.__dict__, "seed": FLAGS.seed,
                       **({"steps": FLAGS.steps} if FLAGS.steps else {})})
  logging.info("world %s\nlm %s", world, lm)
  summary = train_toy_lm(FLAGS.workdir, world, lm)
  logging.info("entropy %.4f; checkpoints %s", summary["entropy_nats_per_token"],
               {k: round(v["eval_loss"], 4) for k, v in summary["checkpoints"].items()})


def run(argv=None):
  """The console command (``sae-jax train-toy-lm``)."""
  app.run(run_main(main), argv=argv)


if __name__ == "__main__":
  run()
