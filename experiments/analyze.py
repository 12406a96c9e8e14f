"""Analyse a finished (or partly finished) trace: feature statistics, language and granularity

A thin wrapper of ``sae-jax analyze`` (sae_jax/commands/analyze.py): same flags."""

from sae_jax.commands.analyze import run

if __name__ == "__main__":
  run()
