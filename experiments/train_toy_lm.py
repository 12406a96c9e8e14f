"""Train the toy world's target model and write its checkpoints (one directory per revision).

A thin wrapper of ``sae-jax train-toy-lm`` (sae_jax/commands/train_toy_lm.py): same flags."""

from sae_jax.commands.train_toy_lm import run

if __name__ == "__main__":
  run()
