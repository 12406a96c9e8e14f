"""SAE architectures, one file each, registered by their ``architecture`` name."""

from sae_jax.saes import registry
from sae_jax.saes.base import Architecture, geometric_median, normalize_inputs

__all__ = ["Architecture", "geometric_median", "normalize_inputs", "registry"]
