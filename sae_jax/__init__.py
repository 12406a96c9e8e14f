"""sae_jax: sparse autoencoders in JAX that trace how a language model learns."""

from sae_jax import errors, kernels, saes, sharding
from sae_jax.config import MeshConfig, SAEConfig, TrainConfig
from sae_jax.saes.sae import SAE
from sae_jax.sharding import make_mesh
from sae_jax.train import train_sae

__version__ = "0.1.0"

__all__ = ["SAE", "MeshConfig", "SAEConfig", "TrainConfig", "__version__", "errors", "kernels",
           "make_mesh", "saes", "sharding", "train_sae"]
