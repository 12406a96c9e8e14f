"""Shipped trace configs: re-exports of ``sae_jax/configs`` (``--config=experiments/configs/toy.py`` as before)."""
