"""Train one SAE: one checkpoint, one hook, from text (stream) or from an activation cache.

A thin wrapper of ``sae-jax train-sae`` (sae_jax/commands/train_sae.py): same flags."""

from sae_jax.commands.train_sae import run

if __name__ == "__main__":
  run()
