"""Llama-family decoder (LlamaForCausalLM layout): LLM-jp-3, Llama 2/3, Mistral, Qwen2.

Implements: RMSNorm (float32), rotary embeddings (default, linear, llama3 scaling), grouped-query
attention, Mistral's sliding window, Qwen2's q/k/v biases, optional attention-output and MLP
biases, SwiGLU MLP, tied or untied embeddings. Parameter names are the checkpoint's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import TransformerConfig
from sae_jax.models.layers import apply_rope, attention, linear, rms_norm, rope_inv_freq

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


def param_specs(cfg: TransformerConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """Checkpoint name -> (shape, logical axes) of every parameter."""
  d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
  specs = {"model.embed_tokens.weight": ((cfg.vocab_size, d), ("vocab", "embed")),
           "model.norm.weight": ((d,), ("embed",))}
  if not cfg.tie_embeddings:
    specs["lm_head.weight"] = ((cfg.vocab_size, d), ("vocab", "embed"))
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    specs.update({
        p + "input_layernorm.weight": ((d,), ("embed",)),
        p + "post_attention_layernorm.weight": ((d,), ("embed",)),
        p + "self_attn.q_proj.weight": ((h * k, d), ("heads", "embed")),
        p + "self_attn.k_proj.weight": ((g * k, d), ("kv_heads", "embed")),
        p + "self_attn.v_proj.weight": ((g * k, d), ("kv_heads", "embed")),
        p + "self_attn.o_proj.weight": ((d, h * k), ("embed", "heads")),
        p + "mlp.gate_proj.weight": ((f, d), ("mlp", "embed")),
        p + "mlp.up_proj.weight": ((f, d), ("mlp", "embed")),
        p + "mlp.down_proj.weight": ((d, f), ("embed", "mlp")),
    })
    if cfg.attn_bias:
      specs.update({p + "self_attn.q_proj.bias": ((h * k,), ("heads",)),
                    p + "self_attn.k_proj.bias": ((g * k,), ("kv_heads",)),
                    p + "self_attn.v_proj.bias": ((g * k,), ("kv_heads",))})
    if cfg.attn_out_bias:
      specs[p + "self_attn.o_proj.bias"] = ((d,), ("embed",))
    if cfg.mlp_bias:
      specs.update({p + "mlp.gate_proj.bias": ((f,), ("mlp",)),
                    p + "mlp.up_proj.bias": ((f,), ("mlp",)),
                    p + "mlp.down_proj.bias": ((d,), ("embed",))})
  return specs


def embed(params, cfg, input_ids, positions):
  return jnp.take(params["model.embed_tokens.weight"], input_ids, axis=0)


def unembed(params, cfg, x):
  x = rms_norm(x, params["model.norm.weight"], cfg.norm_eps)
  w = params["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
  return linear(x, w)


def block(params, cfg: TransformerConfig, i: int, x, mask, positions, visit):
  """One decoder block: x [B, T, D] -> [B, T, D]; ``visit`` sees attn_out and mlp_out."""
  p = f"model.layers.{i}."
  get = lambda name: params.get(p + name)
  b, t, _ = x.shape
  h = rms_norm(x, get("input_layernorm.weight"), cfg.norm_eps)
  q = linear(h, get("self_attn.q_proj.weight"), get("self_attn.q_proj.bias"))
  k = linear(h, get("self_attn.k_proj.weight"), get("self_attn.k_proj.bias"))
  v = linear(h, get("self_attn.v_proj.weight"), get("self_attn.v_proj.bias"))
  q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
  k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  inv = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict)
  q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
  a = attention(q, k, v, mask, positions, cfg.sliding_window).reshape(b, t, -1)
  a = visit("attn_out", linear(a, get("self_attn.o_proj.weight"), get("self_attn.o_proj.bias")))
  x = x + a
  h = rms_norm(x, get("post_attention_layernorm.weight"), cfg.norm_eps)
  gate = linear(h, get("mlp.gate_proj.weight"), get("mlp.gate_proj.bias"))
  up = linear(h, get("mlp.up_proj.weight"), get("mlp.up_proj.bias"))
  m = linear(jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up,
             get("mlp.down_proj.weight"), get("mlp.down_proj.bias"))
  return x + visit("mlp_out", m)
