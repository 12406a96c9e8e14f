"""GPT-2 decoder (GPT2LMHeadModel layout): OpenAI GPT-2 and the Stanford CRFM checkpoint runs.

Implements: learned absolute position embeddings, LayerNorm (float32), fused q/k/v and Conv1D
weights stored [in, out] as in the checkpoint, GELU (tanh approximation or exact), unembedding
tied to the token embedding. Names are the checkpoint's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import TransformerConfig
from sae_jax.models.layers import attention, layer_norm

MODEL_TYPES = ("gpt2",)
_ACTS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh")


def config_from_hf(d: dict) -> TransformerConfig:
  mt = d["model_type"]  # one of MODEL_TYPES: hf.py dispatches on it
  act = d.get("activation_function", "gelu_new")
  if act not in _ACTS:
    raise UnsupportedModelError(f"activation_function={act!r} is not implemented; allowed: "
                                f"{list(_ACTS)}")
  for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if d.get(field):
      raise UnsupportedModelError(f"{field}=True is not implemented")
  if d.get("scale_attn_weights", True) is False:
    raise UnsupportedModelError("scale_attn_weights=False is not implemented")
  hidden, n_heads = int(d["n_embd"]), int(d["n_head"])
  return TransformerConfig(
      family="gpt2", model_type=mt, vocab_size=int(d["vocab_size"]), d_model=hidden,
      n_layers=int(d["n_layer"]), n_heads=n_heads, n_kv_heads=n_heads,
      head_dim=hidden // n_heads, d_mlp=int(d.get("n_inner") or 4 * hidden),
      norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), rope_theta=0.0, rotary_dim=0,
      tie_embeddings=True, attn_bias=True, attn_out_bias=True, mlp_bias=True, activation=act,
      n_positions=int(d.get("n_positions", 1024)), bos_token_id=d.get("bos_token_id"))


def param_specs(cfg: TransformerConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
  d, f = cfg.d_model, cfg.d_mlp
  specs = {"transformer.wte.weight": ((cfg.vocab_size, d), ("vocab", "embed")),
           "transformer.wpe.weight": ((cfg.n_positions, d), ("length", "embed")),
           "transformer.ln_f.weight": ((d,), ("embed",)),
           "transformer.ln_f.bias": ((d,), ("embed",))}
  for i in range(cfg.n_layers):
    p = f"transformer.h.{i}."
    specs.update({
        p + "ln_1.weight": ((d,), ("embed",)), p + "ln_1.bias": ((d,), ("embed",)),
        p + "ln_2.weight": ((d,), ("embed",)), p + "ln_2.bias": ((d,), ("embed",)),
        p + "attn.c_attn.weight": ((d, 3 * d), ("embed", "heads")),
        p + "attn.c_attn.bias": ((3 * d,), ("heads",)),
        p + "attn.c_proj.weight": ((d, d), ("heads", "embed")),
        p + "attn.c_proj.bias": ((d,), ("embed",)),
        p + "mlp.c_fc.weight": ((d, f), ("embed", "mlp")),
        p + "mlp.c_fc.bias": ((f,), ("mlp",)),
        p + "mlp.c_proj.weight": ((f, d), ("mlp", "embed")),
        p + "mlp.c_proj.bias": ((d,), ("embed",)),
    })
  return specs


def _conv1d(x, w, b):
  """GPT-2's Conv1D: x [..., in] @ w [in, out] + b."""
  y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  return (y + b.astype(jnp.float32)).astype(x.dtype)


def embed(params, cfg, input_ids, positions):
  tok = jnp.take(params["transformer.wte.weight"], input_ids, axis=0)
  return tok + jnp.take(params["transformer.wpe.weight"], positions, axis=0)


def unembed(params, cfg, x):
  x = layer_norm(x, params["transformer.ln_f.weight"], params["transformer.ln_f.bias"],
                 cfg.norm_eps)
  w = params["transformer.wte.weight"]
  return jnp.einsum("...d,vd->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def block(params, cfg: TransformerConfig, i: int, x, mask, positions, visit):
  p = f"transformer.h.{i}."
  get = lambda name: params[p + name]
  b, t, d = x.shape
  h = layer_norm(x, get("ln_1.weight"), get("ln_1.bias"), cfg.norm_eps)
  qkv = _conv1d(h, get("attn.c_attn.weight"), get("attn.c_attn.bias"))
  q, k, v = (a.reshape(b, t, cfg.n_heads, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))
  a = attention(q, k, v, mask, positions).reshape(b, t, d)
  x = x + visit("attn_out", _conv1d(a, get("attn.c_proj.weight"), get("attn.c_proj.bias")))
  h = layer_norm(x, get("ln_2.weight"), get("ln_2.bias"), cfg.norm_eps)
  h = _conv1d(h, get("mlp.c_fc.weight"), get("mlp.c_fc.bias"))
  h = jax.nn.gelu(h.astype(jnp.float32), approximate=cfg.activation != "gelu").astype(x.dtype)
  return x + visit("mlp_out", _conv1d(h, get("mlp.c_proj.weight"), get("mlp.c_proj.bias")))
