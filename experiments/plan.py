"""Plan a trace before renting accelerators (memory, FLOPs, projected hours of the study).

A thin wrapper of ``sae-jax plan`` (sae_jax/commands/plan.py): same flags."""

from sae_jax.commands.plan import run

if __name__ == "__main__":
  run()
