r"""The paper's workflow as one command: SAEs for every checkpoint x hook, evaluated and stored.

  sae-jax trace --workdir=runs/toy                              # the toy world
  sae-jax trace --config=sae_jax/configs/toy.py:tiny --workdir=/tmp/t
  sae-jax trace --config=sae_jax/configs/llm_jp_3_1p8b.py --workdir=gs://...
  sae-jax trace --workdir=runs/toy --config.sae.k=16            # overrides

Rerunning skips finished (checkpoint, hook) pairs and resumes a cut-off one exactly.
On several hosts every host runs this same command (see launch/): with SAE_JAX_COORDINATOR set,
or --coordinator=auto on a Cloud TPU VM / SLURM, the processes join one global mesh.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from sae_jax import paths
from sae_jax.console import Console
from sae_jax.cli import load_flag_config, parse_flags_or_exit, run_main, trace_config_from

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "trace config")
flags.DEFINE_string("workdir", None, "output directory (the run store)", required=True)
flags.DEFINE_bool("overwrite", False, "replace a different trace found in --workdir")
flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0, or 'auto' "
                    "(default: $SAE_JAX_COORDINATOR; unset: one process)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax import distributed
  paths.check_location(FLAGS.workdir)  # before JAX starts: a bad bucket is one line at once
  distributed.initialize(FLAGS.coordinator)  # before anything touches a device
  from sae_jax.trace import trace
  cfg = trace_config_from(load_flag_config(FLAGS), FLAGS.workdir)
  logging.info("trace config:\n%s", cfg.to_json())
  console = Console()
  trace(cfg, FLAGS.workdir, overwrite=FLAGS.overwrite, log_fn=console)
  console(f"done: {FLAGS.workdir}/summary.csv")


def run(argv=None):
  """The console command (``sae-jax trace``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
