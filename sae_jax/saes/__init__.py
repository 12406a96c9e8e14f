"""SAE architectures, one file each, registered by their ``architecture`` name."""

from sae_jax.saes import registry
# Importing the architecture modules registers them.
from sae_jax.saes import batchtopk, jumprelu, relu, topk  # noqa: F401  isort: skip
from sae_jax.saes.base import Architecture, NoOptions, geometric_median, normalize_inputs

__all__ = ["Architecture", "NoOptions", "geometric_median", "normalize_inputs", "registry"]
