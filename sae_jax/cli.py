"""What every absl entry point shares: a user mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback

from absl import flags
from absl import logging as absl_logging

from sae_jax.trace_config import TraceConfig
from sae_jax.errors import ConfigError, SaeJaxError


def run_main(main):
  """Wrap an absl ``main`` so sae_jax errors print one line (no traceback) and exit with 2."""

  @functools.wraps(main)
  def wrapped(argv):
    quiet_libraries()
    try:
      return main(argv)
    except SaeJaxError as e:
      print(f"error: {e}", file=sys.stderr)
      _exit(2)
    except SystemExit:
      raise  # a preemption (143) or a normal exit: every host gets there together
    except BaseException:
      if _multi_host():
        traceback.print_exc()
        _exit(1)
      raise

  return wrapped


def quiet_libraries() -> None:
  """The libraries' INFO chatter (Orbax logs every checkpoint step) off unless the user asked
  for it with ``--verbosity`` (``-v``): the progress lines are then what a person reads."""
  verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if verbosity is None or not verbosity.present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Orbax's own warnings ("waiting for previous save took 1.3 s", a step's metadata not yet
    # in a bucket) are about its internals: errors only. gcsfs's retry notes likewise.
    absl_logging.get_absl_logger().addFilter(_not_orbax_chatter)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)


def _not_orbax_chatter(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.ERROR or "/orbax/" not in record.pathname


def _multi_host() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.distributed.is_initialized()


def _exit(code: int):
  """Exit now. On one host of several, skip JAX's shutdown barrier: the other hosts are not
  coming (they wait in a collective for this one), and the launcher stops them."""
  if _multi_host():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_config(argv: list[str]) -> list[str]:
  """``--config=toy:tiny`` (a shipped config's name, no ``.py``) -> that file in the package."""
  out = []
  for a in argv:
    m = re.fullmatch(r"--config=([A-Za-z_]\w*)(:.*)?", a)
    if m and os.path.exists(os.path.join(PACKAGED_CONFIGS, m.group(1) + ".py")):
      a = f"--config={os.path.join(PACKAGED_CONFIGS, m.group(1) + '.py')}{m.group(2) or ''}"
    out.append(a)
  return out


def parse_flags_or_exit(argv):
  """absl flag parsing whose errors (unknown config, bad override type) are one line, exit 2."""
  try:
    return flags.FLAGS(packaged_config(argv))
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError, FileNotFoundError,
          SyntaxError) as e:
    missing = re.fullmatch(r"""["']*'([\w.]+)'["']*""", str(e).strip())
    if isinstance(e, (KeyError, AttributeError)) and missing:
      # ml_collections: an override of a field the config file does not set
      print(f"error: no config field {missing.group(1)!r} to override; a config file sets the "
            "fields its get_config lists", file=sys.stderr)
      sys.exit(2)
    msg = str(e).strip().splitlines()
    print(f"error: {msg[-1] if msg else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


def load_flag_config(flag_values, name: str = "config"):
  """An ml_collections config flag as a dict; a config file that fails to load is one line."""
  try:
    return getattr(flag_values, name).to_dict()  # the file loads lazily: force it here
  except (OSError, SyntaxError, ImportError, AttributeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f"cannot load --{name}: {lines[-1] if lines else type(e).__name__}"
                      ) from None


def trace_config_from(config, workdir: str):
  """An ml_collections trace config -> TraceConfig (relative model/data paths go in workdir)."""
  d = dict(config) if isinstance(config, dict) else config.to_dict()
  if d.get("toy"):
    for holder, key in ((d, "model"), (d.get("data", {}), "path")):
      if holder.get(key) and not os.path.isabs(holder[key]) and "://" not in holder[key]:
        holder[key] = os.path.join(workdir, holder[key])
  return TraceConfig.from_dict(d)


def add_study_settings(c, analysis_eval_tokens: int, exports=("sae_lens",),
                       eval_batches: int = 4, dtype: str = "float32"):
  """The settings every shipped trace shares: extraction, seed baseline, outputs, analysis.

  Present in every config so each can be overridden on the command line
  (``--config.extract.activations=cache``, ``--config.warm_start=True``, ...).
  """
  c.missing_revision = "stop"
  c.warm_start = False  # True: init each SAE from the previous checkpoint's (SAE-Track)
  c.seed_baseline = ("final",)  # a second init seed there ("every": at every checkpoint)
  c.baseline_seeds = 1
  c.extract = dict(
      dtype=dtype,  # the model's compute dtype
      activations="stream",  # or "cache": extract once, same SAEs on any host count
      cache_dtype="float32")
  # devices on "data" (tokens) x "model" (latents, heads); devices=N: only the first N
  c.mesh = dict(data=-1, model=1, devices=0)
  c.outputs = dict(
      exports=tuple(exports),
      eval_batches=eval_batches,  # forward batches of the spliced CE-loss evaluation
      analyze=True,  # features, labels, overlap, report.html at the end
      analysis_eval_tokens=analysis_eval_tokens,
      lexicon="",  # TSV form/concept/category for granularity labels
      match_threshold=0.0,  # 0: calibrated on the seed baselines at false_match_rate
      false_match_rate=0.05,
      min_firings=5,  # features firing less are not matched
      lineage_gap=1)  # weak links a lineage may bridge (one checkpoint each, flagged)
  return c
