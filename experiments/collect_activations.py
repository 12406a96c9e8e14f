"""Extract activations once into tensorstore caches, to train many SAEs from them later.

A thin wrapper of ``sae-jax collect`` (sae_jax/commands/collect.py): same flags."""

from sae_jax.commands.collect import run

if __name__ == "__main__":
  run()
