r"""Train one SAE: one checkpoint, one hook, from text (stream) or from an activation cache.

  sae-jax train-sae --config=sae_jax/configs/toy.py:tiny --workdir=/tmp/sae \
      --revision=step400 --hook=resid_post.0
  sae-jax train-sae --config=... --workdir=/tmp/sae2 --revision=step400 \
      --cache=runs/toy/activations/step400/resid_post.0     # from collect_activations.py

The SAE, its metrics and checkpoints go to --workdir; a rerun resumes it exactly.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from sae_jax import paths
from sae_jax.console import Console
from sae_jax.cli import load_flag_config, parse_flags_or_exit, run_main, trace_config_from

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "trace config "
                                "(its sae, train, data and mesh settings are used)")
flags.DEFINE_string("workdir", None, "run directory of this SAE", required=True)
flags.DEFINE_string("revision", None, "checkpoint label (default: the model directory itself)")
flags.DEFINE_string("hook", None, "activation site (default: the config's first hook)")
flags.DEFINE_string("cache", None, "train from this activation cache instead of from text")
flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0, or 'auto'")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax import distributed
  paths.check_location(FLAGS.workdir)
  if FLAGS.cache:
    paths.check_location(FLAGS.cache, "cache")
  distributed.initialize(FLAGS.coordinator)
  import sae_jax as sj
  from sae_jax.data.cache import CacheReader
  from sae_jax.models.hooks import parse_hook
  from sae_jax.trace import prepare_toy, sae_config_for, sae_metadata, validate
  cfg = trace_config_from(load_flag_config(FLAGS), os.path.dirname(FLAGS.workdir) or ".")
  validate(cfg)
  if cfg.toy:
    prepare_toy(cfg, print)
  hook = FLAGS.hook or cfg.hooks[0]
  model = sj.load_model(cfg.model, revision=FLAGS.revision, dtype=cfg.extract.dtype)
  parse_hook(hook, model.cfg.n_layers)
  sae_cfg = sae_config_for(cfg, model.cfg.d_model)
  if FLAGS.cache:
    rows = CacheReader(FLAGS.cache, expect={"hook": hook, "d_model": model.cfg.d_model},
                       seed=cfg.data.seed)
  else:
    rows = sj.data.hook_rows(model, cfg.data, hook)
  meta = sae_metadata(cfg, sae_cfg, FLAGS.revision, hook)
  sae = sj.train_sae(rows, sae_cfg, cfg.train, workdir=FLAGS.workdir, metadata=meta,
                     log_fn=Console(), mesh=sj.make_mesh(cfg.mesh))
  if distributed.is_primary():
    ev = sae.metadata.get("eval", {})
    print(f"done: {FLAGS.workdir}/sae  fvu={ev.get('fvu', float('nan')):.4f} "
          f"l0={ev.get('l0', float('nan')):.1f}", flush=True)


def run(argv=None):
  """The console command (``sae-jax train-sae``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
