"""sae_jax: sparse autoencoders in JAX that trace how a language model learns."""

from sae_jax import analysis, data, distributed, errors, kernels, saes, sharding, store
from sae_jax.config import (DataConfig, MeshConfig, OptimConfig, RunConfig, SAEConfig,
                            TrainConfig)
from sae_jax.formats import load_sae
from sae_jax.models import load_model
from sae_jax.planning import plan
from sae_jax.saes.sae import SAE
from sae_jax.sharding import make_mesh
from sae_jax.trace import trace
from sae_jax.trace_config import ExtractConfig, OutputConfig, TraceConfig
from sae_jax.train import SAEJob, train_sae, train_saes
from sae_jax.version import __version__

__all__ = ["SAE", "DataConfig", "ExtractConfig", "MeshConfig", "OptimConfig", "OutputConfig",
           "RunConfig", "SAEConfig", "SAEJob", "TraceConfig", "TrainConfig", "__version__",
           "analysis", "data", "distributed", "errors", "kernels", "load_model", "load_sae",
           "make_mesh", "plan", "saes", "sharding", "store", "trace", "train_sae", "train_saes"]
