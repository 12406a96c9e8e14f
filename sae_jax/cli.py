"""What every absl entry point shares: a user mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys

from sae_jax.errors import SaeJaxError


def run_main(main):
  """Wrap an absl ``main`` so sae_jax errors print one line (no traceback) and exit with 2."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except SaeJaxError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
