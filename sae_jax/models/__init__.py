"""Flax ports of the target models, their Hugging Face loader and hook names."""

from sae_jax.models.base import Model, TransformerConfig
from sae_jax.models.hf import load_model
from sae_jax.models.hooks import Hook, parse_hook

__all__ = ["Hook", "Model", "TransformerConfig", "load_model", "parse_hook"]
