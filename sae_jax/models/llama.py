"""Llama-family decoder (LlamaForCausalLM layout): LLM-jp-3, Llama 2/3, Mistral, Qwen2.

Implements: RMSNorm (float32), rotary embeddings (default, linear, llama3 scaling), grouped-query
attention, Mistral's sliding window, Qwen2's q/k/v biases, optional attention-output and MLP
biases, SwiGLU MLP, tied or untied embeddings. Attribute paths are the checkpoint's tensor names
(``LlamaForCausalLM.model.layers[i].self_attn.q_proj.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import CausalLM, TransformerConfig
from sae_jax.models.layers import (Embedding, Linear, RMSNorm, apply_rope, attention, linear,
                                   rope_inv_freq)

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")


def _rope(d: dict) -> tuple[float, tuple]:
  """(theta, scaling) from either the old (rope_theta + rope_scaling) or new config layout."""
  params = d.get("rope_parameters") or {}
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  scaling = d.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind not in _ROPE_TYPES:
    raise UnsupportedModelError(f"rope type {kind!r} is not implemented; allowed: "
                                f"{list(_ROPE_TYPES)}")
  if kind == "default":
    return theta, ()
  keep = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
  items = {k: v for k, v in scaling.items() if k in keep}
  return theta, tuple(sorted({"rope_type": kind, **items}.items()))


def config_from_hf(d: dict) -> TransformerConfig:
  """Check a HF config (model_type in MODEL_TYPES: hf.py dispatches on it) and convert it."""
  mt = d["model_type"]
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"hidden_act={act!r} is not implemented; allowed: 'silu'")
  if mt == "qwen2" and d.get("use_sliding_window"):
    raise UnsupportedModelError("use_sliding_window=True is not implemented for qwen2")
  n_heads = int(d["num_attention_heads"])
  hidden = int(d["hidden_size"])
  head_dim = int(d.get("head_dim") or hidden // n_heads)
  theta, scaling = _rope(d)
  window = d.get("sliding_window") if mt == "mistral" else None
  return TransformerConfig(
      family="llama", model_type=mt, vocab_size=int(d["vocab_size"]), d_model=hidden,
      n_layers=int(d["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(d.get("num_key_value_heads") or n_heads), head_dim=head_dim,
      d_mlp=int(d["intermediate_size"]), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rotary_dim=head_dim, rope_scaling=scaling,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      attn_bias=bool(d.get("attention_bias", mt == "qwen2")),
      attn_out_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
      mlp_bias=bool(d.get("mlp_bias", False)), activation="silu",
      sliding_window=int(window) if window else None, bos_token_id=d.get("bos_token_id"))


class LlamaAttention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, h * k, ("heads", "embed"), cfg.attn_bias, dtype)
    self.k_proj = Linear(d, g * k, ("kv_heads", "embed"), cfg.attn_bias, dtype)
    self.v_proj = Linear(d, g * k, ("kv_heads", "embed"), cfg.attn_bias, dtype)
    self.o_proj = Linear(h * k, d, ("embed", "heads"), cfg.attn_out_bias, dtype)

  def __call__(self, h, cfg: TransformerConfig, mask, positions):
    b, t, _ = h.shape
    q = self.q_proj(h).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = self.v_proj(h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    inv = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    return self.o_proj(attention(q, k, v, mask, positions, cfg.sliding_window).reshape(b, t, -1))


class LlamaMLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    d, f, bias = cfg.d_model, cfg.d_mlp, cfg.mlp_bias
    self.gate_proj = Linear(d, f, ("mlp", "embed"), bias, dtype)
    self.up_proj = Linear(d, f, ("mlp", "embed"), bias, dtype)
    self.down_proj = Linear(f, d, ("embed", "mlp"), bias, dtype)

  def __call__(self, h):
    gate = jax.nn.silu(self.gate_proj(h).astype(jnp.float32)).astype(h.dtype)
    return self.down_proj(gate * self.up_proj(h))


class LlamaDecoderLayer(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.self_attn = LlamaAttention(cfg, dtype)
    self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.mlp = LlamaMLP(cfg, dtype)

  def __call__(self, x, cfg: TransformerConfig, mask, positions, visit):
    """x [B, T, D] -> [B, T, D]; ``visit`` sees (and may replace) attn_out and mlp_out."""
    x = x + visit("attn_out", self.self_attn(self.input_layernorm(x), cfg, mask, positions))
    return x + visit("mlp_out", self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype)
    self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)


class LlamaForCausalLM(CausalLM):
  """LlamaForCausalLM: ``model`` (embed_tokens, layers, norm) and ``lm_head`` (None if tied)."""

  def __init__(self, cfg: TransformerConfig, dtype=jnp.float32):
    super().__init__(cfg)
    self.model = LlamaModel(cfg, dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    Linear(cfg.d_model, cfg.vocab_size, ("vocab", "embed"), dtype=dtype))

  @property
  def layers(self):
    return self.model.layers

  def embed(self, input_ids, positions):
    return self.model.embed_tokens(input_ids)

  def unembed(self, x):
    x = self.model.norm(x)
    if self.lm_head is None:
      return linear(x, self.model.embed_tokens.weight.get_value())
    return self.lm_head(x)


MODEL_CLASS = LlamaForCausalLM
