r"""Extract activations once into tensorstore caches, to train many SAEs from them later.

  sae-jax collect --config=sae_jax/configs/toy.py:tiny \
      --workdir=runs/toy                 # -> runs/toy/activations/<checkpoint>/<hook>/
  sae-jax collect --config=... --workdir=... --revisions=step100

Every host of a multi-host run writes its own batches (resumable: rerun after a kill); a later
`trace.py --config.extract.activations=cache` with the same settings trains from these caches.
"""

import os

from absl import app, flags

from sae_jax import paths
from sae_jax.console import Console
from sae_jax.cli import load_flag_config, parse_flags_or_exit, run_main, trace_config_from
from ml_collections import config_flags

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "trace config")
flags.DEFINE_string("workdir", None, "run directory (caches go to <workdir>/activations/)",
                    required=True)
flags.DEFINE_list("revisions", [], "checkpoints to extract (default: the config's, or all)")
flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0, or 'auto'")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax import distributed
  paths.check_location(FLAGS.workdir)
  distributed.initialize(FLAGS.coordinator)
  from sae_jax import store
  from sae_jax.models import load_model
  from sae_jax.models.hooks import parse_hook
  from sae_jax.trace import prepare_toy, revisions_of, write_caches
  cfg = trace_config_from(load_flag_config(FLAGS), FLAGS.workdir)
  if cfg.toy:
    prepare_toy(cfg, print)
  st = store.Store(FLAGS.workdir, cfg.model)
  revisions = FLAGS.revisions or revisions_of(cfg)
  for n, rev in enumerate(revisions):
    model = load_model(cfg.model, revision=rev, dtype=cfg.extract.dtype)
    for hook in cfg.hooks:
      parse_hook(hook, model.cfg.n_layers)
    caches = write_caches(cfg, model, rev, cfg.hooks, st, log_fn=Console())
    print(f"[{n + 1}/{len(revisions)}] {rev}: " + ", ".join(str(p) for p in caches.values()),
          flush=True)


def run(argv=None):
  """The console command (``sae-jax collect``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
