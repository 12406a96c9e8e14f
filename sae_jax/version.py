"""The package version (recorded in every file sae_jax writes)."""

__version__ = "0.1.0"
