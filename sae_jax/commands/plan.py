r"""Plan a trace before renting accelerators: compile its functions for a TPU slice from shapes
alone (no weights, no TPU needed; libtpu from the ``tpu`` extra) and print one JSON line per
function (forward, sae_step, eval), then the whole study's projection (``trace``).

  sae-jax plan --config=llm_jp_3_1p8b --topology=v5e:4x4
  sae-jax plan --config=llm_jp_3_1p8b --topology=v5e:4x4 --mesh=4,4   # (data, model) of 16 chips
  sae-jax plan --config=toy:tiny --topology=h100:8                     # a GPU estimate

A study that does not fit says so in one line on stderr (the numbers, and a layout that fits).
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sae_jax.cli import load_flag_config, parse_flags_or_exit, run_main, trace_config_from

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "trace config")
flags.DEFINE_string("topology", None, "TPU slice (v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x4) or GPU "
                    "estimate (h100:8, h200:1, a100:8)", required=True)
flags.DEFINE_string("mesh", None, "data,model devices (default: all on data)")
flags.DEFINE_string("model_config", None, "config.json of a model neither local nor published")
flags.DEFINE_bool("search", True, "when the study does not fit, compile other layouts")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from sae_jax.planning import mesh_config, plan  # after flags: importing jax is slow
  cfg = trace_config_from(load_flag_config(FLAGS), ".")
  reports = plan(cfg, FLAGS.topology, mesh_config(FLAGS.mesh), FLAGS.model_config,
                 search=FLAGS.search)
  for r in reports:
    print(json.dumps(r), flush=True)
  if reports[-1].get("advice"):
    print(reports[-1]["advice"], file=sys.stderr)


def run(argv=None):
  """The console command (``sae-jax plan``)."""
  app.run(run_main(main), argv=argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
