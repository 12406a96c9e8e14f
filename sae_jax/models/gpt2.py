"""GPT-2 decoder (GPT2LMHeadModel layout): OpenAI GPT-2 and the Stanford CRFM checkpoint runs.

Implements: learned absolute position embeddings, LayerNorm (float32), fused q/k/v and Conv1D
weights stored [in, out] as in the checkpoint, GELU (tanh approximation or exact), unembedding
tied to the token embedding. Attribute paths are the checkpoint's tensor names
(``GPT2LMHeadModel.transformer.h[i].attn.c_attn.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.errors import UnsupportedModelError
from sae_jax.models.base import CausalLM, TransformerConfig
from sae_jax.models.layers import Conv1D, Embedding, LayerNorm, attention

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


class GPT2Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    d = cfg.d_model
    self.c_attn = Conv1D(d, 3 * d, ("embed", "heads"), dtype)
    self.c_proj = Conv1D(d, d, ("heads", "embed"), dtype)

  def __call__(self, h, cfg: TransformerConfig, mask, positions):
    b, t, d = h.shape
    q, k, v = (a.reshape(b, t, cfg.n_heads, cfg.head_dim)
               for a in jnp.split(self.c_attn(h), 3, axis=-1))
    return self.c_proj(attention(q, k, v, mask, positions).reshape(b, t, d))


class GPT2MLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.c_fc = Conv1D(cfg.d_model, cfg.d_mlp, ("embed", "mlp"), dtype)
    self.c_proj = Conv1D(cfg.d_mlp, cfg.d_model, ("mlp", "embed"), dtype)

  def __call__(self, h, activation: str):
    h = self.c_fc(h)
    h = jax.nn.gelu(h.astype(jnp.float32), approximate=activation != "gelu").astype(h.dtype)
    return self.c_proj(h)


class GPT2Block(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.attn = GPT2Attention(cfg, dtype)
    self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)
    self.mlp = GPT2MLP(cfg, dtype)

  def __call__(self, x, cfg: TransformerConfig, mask, positions, visit):
    x = x + visit("attn_out", self.attn(self.ln_1(x), cfg, mask, positions))
    return x + visit("mlp_out", self.mlp(self.ln_2(x), cfg.activation))


class GPT2Model(nnx.Module):
  def __init__(self, cfg: TransformerConfig, dtype):
    self.wte = Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype)
    self.wpe = Embedding(cfg.n_positions, cfg.d_model, ("length", "embed"), dtype)
    self.h = nnx.List([GPT2Block(cfg, dtype) for _ in range(cfg.n_layers)])
    self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps, dtype)


class GPT2LMHeadModel(CausalLM):
  """GPT2LMHeadModel: ``transformer`` (wte, wpe, h, ln_f); the unembedding is ``wte``."""

  def __init__(self, cfg: TransformerConfig, dtype=jnp.float32):
    super().__init__(cfg)
    self.transformer = GPT2Model(cfg, dtype)

  @property
  def layers(self):
    return self.transformer.h

  def embed(self, input_ids, positions):
    return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

  def unembed(self, x):
    x = self.transformer.ln_f(x)
    w = self.transformer.wte.weight.get_value()
    return jnp.einsum("...d,vd->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


MODEL_CLASS = GPT2LMHeadModel
