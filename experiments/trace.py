"""The paper's workflow as one command: SAEs for every checkpoint x hook, evaluated and stored.

A thin wrapper of ``sae-jax trace`` (sae_jax/commands/trace.py): same flags."""

from sae_jax.commands.trace import run

if __name__ == "__main__":
  run()
