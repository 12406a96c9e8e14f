"""sae_jax: sparse autoencoders in JAX that trace how a language model learns."""

__version__ = "0.1.0"  # before the imports: submodules record it in what they write

from sae_jax import analysis, data, distributed, errors, kernels, saes, sharding
from sae_jax.config import DataConfig, MeshConfig, SAEConfig, TrainConfig
from sae_jax.formats import load_sae
from sae_jax.models import load_model
from sae_jax.saes.sae import SAE
from sae_jax.sharding import make_mesh
from sae_jax.train import SAEJob, train_sae, train_saes

__all__ = ["SAE", "DataConfig", "MeshConfig", "SAEConfig", "SAEJob", "TrainConfig", "__version__",
           "analysis", "data", "distributed", "errors", "kernels", "load_model", "load_sae",
           "make_mesh", "saes", "sharding", "train_sae", "train_saes"]
