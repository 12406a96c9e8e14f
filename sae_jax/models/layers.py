"""Pieces shared by the model families: norms, rotary embeddings, masked attention, and the
Flax NNX modules holding their parameters (``Linear``, ``Conv1D``, ``Embedding``, ``RMSNorm``,
``LayerNorm``).

Axes: B batch, T positions (S: key positions), D model width, H query heads, G key/value heads,
K head dim, F mlp width. Norms, softmax and rotary angles run in float32 whatever the compute
dtype. Every parameter carries its logical axis names (``out_sharding`` metadata, e.g.
("heads", "embed")); only ``sae_jax.sharding``'s rules table maps them to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -1e30  # finite: a fully masked (padding) query row stays finite


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """[..., D] -> [..., D]: x / rms(x) * weight, computed in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """[..., D] -> [..., D] LayerNorm in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.mean((x32 - mean) ** 2, axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> jax.Array:
  """[rotary_dim / 2] inverse frequencies, with linear or llama3 scaling when configured."""
  inv = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  if not scaling:
    return inv
  kind = scaling["rope_type"]
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = jnp.where(wavelen > old_len / lo, inv / factor, inv)
    is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return jnp.where(is_mid, mid, out)
  raise ValueError(kind)  # configs are checked against the allow-list before this


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate the first 2*len(inv_freq) dims of x [B, T, H, K] (rotate-half layout, as HF)."""
  rot = 2 * inv_freq.shape[0]
  ang = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, rot/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xr = x[..., :rot].astype(jnp.float32)
  half = rot // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = (xr * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, x[..., rot:]], axis=-1) if rot < x.shape[-1] else out


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """[B, T] 0/1 attention mask -> positions counting real tokens only (left padding safe)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              positions: jax.Array, sliding_window: int | None = None) -> jax.Array:
  """Causal attention with key padding and grouped key/value heads.

  Args:
    q: [B, T, H, K]; k, v: [B, T, G, K] with H a multiple of G.
    mask: [B, T] 1 for real tokens, 0 for padding.
    positions: [B, T] token positions (causality and the sliding window use them).

  Returns:
    [B, T, H, K].
  """
  b, t, h, kd = q.shape
  g = k.shape[2]
  qg = q.reshape(b, t, g, h // g, kd)
  scores = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(kd)
  idx = jnp.arange(t)
  allowed = (idx[None, :, None] >= idx[None, None, :]) & (mask[:, None, :] > 0)  # [B, T, S]
  if sliding_window is not None:
    allowed &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
  scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgk->btgrk", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, kd).astype(q.dtype)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """x [..., in] @ weight^T ([out, in], the PyTorch layout kept from the checkpoint)."""
  y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def param(shape: tuple[int, ...], axes: tuple[str, ...], dtype=jnp.float32, fill: float = 0.0
          ) -> nnx.Param:
  """A parameter named by logical ``axes`` (metadata only: nothing is sharded when created)."""
  return nnx.Param(jnp.full(shape, fill, dtype), out_sharding=tuple(axes), eager_sharding=False)


def axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names a parameter was created with."""
  return tuple(variable.get_metadata()["out_sharding"])


class Linear(nnx.Module):
  """x @ weight^T + bias with weight [out, in] (PyTorch's nn.Linear layout, as checkpointed)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], bias: bool = False,
               dtype=jnp.float32):
    self.weight = param((d_out, d_in), axes, dtype)
    self.bias = param((d_out,), axes[:1], dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, self.weight.get_value(),
                  None if self.bias is None else self.bias.get_value())


class Conv1D(nnx.Module):
  """GPT-2's Conv1D: x @ weight + bias with weight [in, out] (the checkpoint's layout)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], dtype=jnp.float32):
    self.weight = param((d_in, d_out), axes, dtype)
    self.bias = param((d_out,), axes[1:], dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight.get_value().astype(x.dtype)
    y = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
    return (y + self.bias.get_value().astype(jnp.float32)).astype(x.dtype)


class Embedding(nnx.Module):
  """A [rows, D] table looked up by index (tokens, or GPT-2's learned positions)."""

  def __init__(self, rows: int, d: int, axes: tuple[str, str], dtype=jnp.float32):
    self.weight = param((rows, d), axes, dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight.get_value(), ids, axis=0)


class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float, dtype=jnp.float32):
    self.weight, self.eps = param((d,), ("embed",), dtype, 1.0), eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight.get_value(), self.eps)


class LayerNorm(nnx.Module):
  def __init__(self, d: int, eps: float, dtype=jnp.float32):
    self.weight, self.eps = param((d,), ("embed",), dtype, 1.0), eps
    self.bias = param((d,), ("embed",), dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.weight.get_value(), self.bias.get_value(), self.eps)
