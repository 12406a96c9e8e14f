"""Flax NNX ports of the target models, their Hugging Face loader and hook names."""

from sae_jax.models.base import CausalLM, Model, TransformerConfig
from sae_jax.models.gpt2 import GPT2LMHeadModel
from sae_jax.models.gpt_neox import GPTNeoXForCausalLM
from sae_jax.models.hf import abstract_model, load_model
from sae_jax.models.hooks import Hook, parse_hook
from sae_jax.models.llama import LlamaForCausalLM

__all__ = ["CausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Hook", "LlamaForCausalLM",
           "Model", "TransformerConfig", "abstract_model", "load_model", "parse_hook"]
