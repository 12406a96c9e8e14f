"""GPT-NeoX decoder (GPTNeoXForCausalLM layout): the Pythia suite and its 154 checkpoints.

Implements: LayerNorm (float32), fused per-head query/key/value with biases, partial rotary
embeddings (rotary_pct / partial_rotary_factor), parallel or sequential residual, GELU MLP
(exact or tanh approximation), untied or tied unembedding. Attribute paths are the
checkpoint's tensor names (``GPTNeoXForCausalLM.gpt_neox.layers[i].attention.dense.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import CausalLM, TransformerConfig
from sae_jax.models.layers import (Embedding, LayerNorm, Linear, apply_rope, attention, linear,
                                   rope_inv_freq)

MODEL_TYPES = ("gpt_neox",)
_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def config_from_hf(d: dict) -> TransformerConfig:
  mt = d["model_type"]  # one of MODEL_TYPES: hf.py dispatches on it
  act = d.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise UnsupportedModelError(f"hidden_act={act!r} is not implemented; allowed: {list(_ACTS)}")
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling")
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", params.get("rope_type",
                                                                                 "default")))
  if kind != "default":
    raise UnsupportedModelError(f"rope type {kind!r} is not implemented for gpt_neox; "
                                "allowed: ['default']")
  hidden, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
  head_dim = hidden // n_heads
  pct = float(params.get("partial_rotary_factor", d.get("rotary_pct", 0.25)))
  theta = float(params.get("rope_theta", d.get("rotary_emb_base", d.get("rope_theta", 10000))))
  return TransformerConfig(
      family="gpt_neox", model_type=mt, vocab_size=int(d["vocab_size"]), d_model=hidden,
      n_layers=int(d["num_hidden_layers"]), n_heads=n_heads, n_kv_heads=n_heads,
      head_dim=head_dim, d_mlp=int(d["intermediate_size"]),
      norm_eps=float(d.get("layer_norm_eps", 1e-5)), rope_theta=theta,
      rotary_dim=int(head_dim * pct), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      attn_bias=bool(d.get("attention_bias", True)), attn_out_bias=bool(d.get("attention_bias",
                                                                               True)),
      mlp_bias=True, activation=act, parallel_residual=bool(d.get("use_parallel_residual", True)),
      bos_token_id=d.get("bos_token_id"))


def _gelu(x, kind):
  return jax.nn.gelu(x.astype(jnp.float32), approximate=kind != "gelu").astype(x.dtype)


class GPTNeoXAttention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    d, hk = cfg.d_model, cfg.n_heads * cfg.head_dim
    # Rows per head [q | k | v]: splitting them over "heads" keeps each head's three together.
    self.query_key_value = Linear(d, 3 * hk, ("heads", "embed"), cfg.attn_bias, dtype)
    self.dense = Linear(hk, d, ("embed", "heads"), cfg.attn_bias, dtype)

  def __call__(self, h, cfg: TransformerConfig, mask, positions):
    b, t, _ = h.shape
    qkv = self.query_key_value(h).reshape(b, t, cfg.n_heads, 3 * cfg.head_dim)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    inv = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, None)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    return self.dense(attention(q, k, v, mask, positions).reshape(b, t, -1))


class GPTNeoXMLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.dense_h_to_4h = Linear(cfg.d_model, cfg.d_mlp, ("mlp", "embed"), True, dtype)
    self.dense_4h_to_h = Linear(cfg.d_mlp, cfg.d_model, ("embed", "mlp"), True, dtype)

  def __call__(self, h, activation: str):
    return self.dense_4h_to_h(_gelu(self.dense_h_to_4h(h), activation))


class GPTNeoXLayer(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.input_layernorm = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.post_attention_layernorm = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.attention = GPTNeoXAttention(cfg, dtype)
    self.mlp = GPTNeoXMLP(cfg, dtype)

  def __call__(self, x, cfg: TransformerConfig, mask, positions, visit):
    a = visit("attn_out", self.attention(self.input_layernorm(x), cfg, mask, positions))

    def mlp(y):
      return visit("mlp_out", self.mlp(self.post_attention_layernorm(y), cfg.activation))

    if cfg.parallel_residual:
      return x + a + mlp(x)
    x = x + a
    return x + mlp(x)


class GPTNeoXModel(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.embed_in = Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype)
    self.layers = nnx.List([GPTNeoXLayer(cfg, dtype) for _ in range(cfg.n_layers)])
    self.final_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)


class GPTNeoXForCausalLM(CausalLM):
  """GPTNeoXForCausalLM: ``gpt_neox`` (embed_in, layers, final_layer_norm) and ``embed_out``
  (None if tied)."""

  def __init__(self, cfg: TransformerConfig, dtype=jnp.float32):
    super().__init__(cfg)
    self.gpt_neox = GPTNeoXModel(cfg, dtype)
    self.embed_out = (None if cfg.tie_embeddings else
                      Linear(cfg.d_model, cfg.vocab_size, ("vocab", "embed"), dtype=dtype))

  @property
  def layers(self):
    return self.gpt_neox.layers

  def embed(self, input_ids, positions):
    return self.gpt_neox.embed_in(input_ids)

  def unembed(self, x):
    x = self.gpt_neox.final_layer_norm(x)
    if self.embed_out is None:
      return linear(x, self.gpt_neox.embed_in.weight.get_value())
    return self.embed_out(x)


MODEL_CLASS = GPTNeoXForCausalLM
