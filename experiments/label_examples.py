"""Label features from their examples: the paper's language rule (and the script variant) and

A thin wrapper of ``sae-jax label-examples`` (sae_jax/commands/label_examples.py): same flags."""

from sae_jax.commands.label_examples import run

if __name__ == "__main__":
  run()
