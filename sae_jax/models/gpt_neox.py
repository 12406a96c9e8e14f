"""GPT-NeoX decoder (GPTNeoXForCausalLM layout): the Pythia suite and its 154 checkpoints.

Implements: LayerNorm (float32), fused per-head query/key/value with biases, partial rotary
embeddings (rotary_pct / partial_rotary_factor), parallel or sequential residual, GELU MLP
(exact or tanh approximation), untied or tied unembedding. Names are the checkpoint's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import TransformerConfig
from sae_jax.models.layers import apply_rope, attention, layer_norm, linear, rope_inv_freq

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


def param_specs(cfg: TransformerConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
  d, h, k, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp
  specs = {"gpt_neox.embed_in.weight": ((cfg.vocab_size, d), ("vocab", "embed")),
           "gpt_neox.final_layer_norm.weight": ((d,), ("embed",)),
           "gpt_neox.final_layer_norm.bias": ((d,), ("embed",))}
  if not cfg.tie_embeddings:
    specs["embed_out.weight"] = ((cfg.vocab_size, d), ("vocab", "embed"))
  for i in range(cfg.n_layers):
    p = f"gpt_neox.layers.{i}."
    specs.update({
        p + "input_layernorm.weight": ((d,), ("embed",)),
        p + "input_layernorm.bias": ((d,), ("embed",)),
        p + "post_attention_layernorm.weight": ((d,), ("embed",)),
        p + "post_attention_layernorm.bias": ((d,), ("embed",)),
        p + "attention.query_key_value.weight": ((3 * h * k, d), ("heads", "embed")),
        p + "attention.dense.weight": ((d, h * k), ("embed", "heads")),
        p + "mlp.dense_h_to_4h.weight": ((f, d), ("mlp", "embed")),
        p + "mlp.dense_h_to_4h.bias": ((f,), ("mlp",)),
        p + "mlp.dense_4h_to_h.weight": ((d, f), ("embed", "mlp")),
        p + "mlp.dense_4h_to_h.bias": ((d,), ("embed",)),
    })
    if cfg.attn_bias:
      specs[p + "attention.query_key_value.bias"] = ((3 * h * k,), ("heads",))
      specs[p + "attention.dense.bias"] = ((d,), ("embed",))
  return specs


def embed(params, cfg, input_ids, positions):
  return jnp.take(params["gpt_neox.embed_in.weight"], input_ids, axis=0)


def unembed(params, cfg, x):
  x = layer_norm(x, params["gpt_neox.final_layer_norm.weight"],
                 params["gpt_neox.final_layer_norm.bias"], cfg.norm_eps)
  w = params["gpt_neox.embed_in.weight" if cfg.tie_embeddings else "embed_out.weight"]
  return linear(x, w)


def _gelu(x, kind):
  return jax.nn.gelu(x.astype(jnp.float32), approximate=kind != "gelu").astype(x.dtype)


def block(params, cfg: TransformerConfig, i: int, x, mask, positions, visit):
  p = f"gpt_neox.layers.{i}."
  get = lambda name: params.get(p + name)
  b, t, _ = x.shape
  h = layer_norm(x, get("input_layernorm.weight"), get("input_layernorm.bias"), cfg.norm_eps)
  qkv = linear(h, get("attention.query_key_value.weight"), get("attention.query_key_value.bias"))
  qkv = qkv.reshape(b, t, cfg.n_heads, 3 * cfg.head_dim)  # per-head [q | k | v]
  q, k, v = jnp.split(qkv, 3, axis=-1)
  inv = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, None)
  q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
  a = attention(q, k, v, mask, positions).reshape(b, t, -1)
  a = visit("attn_out", linear(a, get("attention.dense.weight"), get("attention.dense.bias")))

  def mlp(y):
    y = layer_norm(y, get("post_attention_layernorm.weight"), get("post_attention_layernorm.bias"),
                   cfg.norm_eps)
    y = _gelu(linear(y, get("mlp.dense_h_to_4h.weight"), get("mlp.dense_h_to_4h.bias")),
              cfg.activation)
    return visit("mlp_out", linear(y, get("mlp.dense_4h_to_h.weight"), get("mlp.dense_4h_to_h.bias")))

  if cfg.parallel_residual:
    return x + a + mlp(x)
  x = x + a
  return x + mlp(x)
