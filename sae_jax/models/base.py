"""The model every family plugs into: config, hook-driven forward, user-facing Model.

A family module (``llama.py``, ``gpt_neox.py``, ``gpt2.py``) provides ``config_from_hf``, ``param_specs``
(name -> shape, logical axes; names are the checkpoint's own) and ``embed`` / ``block`` /
``unembed``. The forward here runs only the blocks the requested hooks need and can replace the
activation at any hook by a function of it (the splice used for CE-loss-recovered evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sae_jax.errors import DataError
from sae_jax.models.hooks import Hook, parse_hook
from sae_jax.models.layers import positions_from_mask


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """What the ports implement, read from a Hugging Face config.json (see each family)."""

  family: str
  model_type: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_mlp: int
  norm_eps: float
  rope_theta: float
  rotary_dim: int
  rope_scaling: tuple = ()  # sorted (key, value) pairs, or () for none
  tie_embeddings: bool = False
  attn_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  activation: str = "silu"
  parallel_residual: bool = False
  sliding_window: int | None = None
  n_positions: int = 0  # learned absolute positions (GPT-2); 0 for rotary models
  bos_token_id: int | None = None

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None


def forward(family: ModuleType, cfg: TransformerConfig, params: dict, input_ids: jax.Array,
            mask: jax.Array, capture: tuple[Hook, ...], splice: tuple[tuple[Hook, Callable], ...],
            logits: bool, compute_dtype, splice_args: tuple = ()):
  """Run the model up to what ``capture`` / ``logits`` need.

  ``splice_args``: one entry per ``splice`` entry, None or a pytree of arrays passed to that
  splice function as its second argument (traced, so it is not part of the compile key).
  Returns (dict hook name -> [B, T, D] float32, logits [B, T, V] float32 or None).
  """
  args = dict(zip((h for h, _ in splice), splice_args))
  edits = {h: (fn if args.get(h) is None else functools.partial(fn, args=args[h]))
           for h, fn in splice}
  n_blocks = cfg.n_layers if logits else max([h.blocks_needed for h in capture], default=0)
  positions = positions_from_mask(mask)
  out: dict[str, jax.Array] = {}
  wanted = set(capture)

  def visit(kind: str, layer: int, x: jax.Array) -> jax.Array:
    hook = Hook(kind, layer)
    if hook in edits:
      x = edits[hook](x).astype(x.dtype)
    if hook in wanted:
      out[hook.name] = x.astype(jnp.float32)
    return x

  x = family.embed(params, cfg, input_ids, positions).astype(compute_dtype)
  for i in range(n_blocks):
    x = visit("resid_pre", i, x)
    x = family.block(params, cfg, i, x, mask, positions,
                     lambda kind, a, i=i: visit(kind, i, a))
    x = visit("resid_post", i, x)
  for h in capture:  # resid_pre of the block after the last one run
    if h.name not in out and h.kind == "resid_pre" and h.layer == n_blocks:
      out[h.name] = visit("resid_pre", h.layer, x).astype(jnp.float32)
  return out, (family.unembed(params, cfg, x).astype(jnp.float32) if logits else None)


# One compiled forward per (family, config, capture, splice, logits, dtype, input shapes), shared
# by every Model with that config: the parameters are an argument, so the cache holds no Model
# and no parameters, and the checkpoints of one trace (same config) compile once. The splice
# callables are part of the key, so the cache keeps each one alive with whatever it closes over
# (a closure over an SAE keeps that SAE and its weights) until ``_forward_jit.clear_cache()`` or
# ``jax.clear_caches()``; each distinct callable also compiles once, so reuse one per SAE.
# Splice functions that need arrays (an SAE's weights) take them through ``splice_args``.
_forward_jit = jax.jit(forward, static_argnums=(0, 1, 5, 6, 7, 8))


class Model:
  """A loaded transformer: parameters (possibly sharded), config, tokenizer path.

  Attributes:
    cfg: TransformerConfig. params: checkpoint-named arrays. path: the local directory.
    compute_dtype: dtype of activations and matmul inputs (norms/softmax run in float32).
  """

  def __init__(self, family: ModuleType, cfg: TransformerConfig, params: dict, path: str,
               revision: str | None, compute_dtype, mesh: Mesh | None = None):
    self.family, self.cfg, self.params = family, cfg, params
    self.path, self.revision, self.mesh = path, revision, mesh
    self.compute_dtype = jnp.dtype(compute_dtype)
    self._tokenizer = None

  @property
  def tokenizer(self):
    """The tokenizer saved with the checkpoint (``AutoTokenizer``, no remote code)."""
    if self._tokenizer is None:
      from transformers import AutoTokenizer
      self._tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
    return self._tokenizer

  def hooks(self, names) -> tuple[Hook, ...]:
    return tuple(parse_hook(n, self.cfg.n_layers) for n in names)

  def _run(self, input_ids, mask, capture, splice, logits, splice_args=None):
    splice_args = tuple((splice_args or {}).get(h.name) for h, _ in splice)
    return _forward_jit(self.family, self.cfg, self.params, input_ids, mask, capture, splice,
                        logits, self.compute_dtype, splice_args)

  def _inputs(self, input_ids, attention_mask):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise DataError(f"input_ids must be an integer [batch, positions] array; got "
                      f"{ids.dtype}{tuple(ids.shape)}")
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(
        attention_mask, jnp.int32)
    if mask.shape != ids.shape:
      raise DataError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape "
                      f"{tuple(ids.shape)}")
    return ids, mask

  def activations(self, input_ids, hooks, attention_mask=None, splice=None) -> dict:
    """dict hook -> [B, T, D] float32; runs no block past the deepest hook.

    Args:
      input_ids: [B, T] int token ids. hooks: hook names or aliases (see ``hooks.py``).
      attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right).
      splice: optional {hook name: fn([B, T, D]) -> [B, T, D]} applied during the forward.
    """
    ids, mask = self._inputs(input_ids, attention_mask)
    capture = self.hooks(hooks)
    out, _ = self._run(ids, mask, capture, self._splice(splice), False)
    return {name: out[parse_hook(name, self.cfg.n_layers).name] for name in hooks}

  def logits(self, input_ids, attention_mask=None, splice=None, splice_args=None) -> jax.Array:
    """[B, T, vocab] float32 logits, optionally with activations replaced at hooks.

    ``splice``: {hook name: fn}; ``splice_args``: {hook name: pytree of arrays}, given to that
    hook's fn as ``fn(x, args=...)`` (pass weights this way rather than closing over them: a
    closure is part of the compile key and stays cached with what it holds).
    """
    ids, mask = self._inputs(input_ids, attention_mask)
    splice = self._splice(splice)
    args = {parse_hook(n, self.cfg.n_layers).name: v for n, v in (splice_args or {}).items()}
    _, logits = self._run(ids, mask, (), splice, True, args)
    return logits

  def _splice(self, splice) -> tuple:
    if not splice:
      return ()
    return tuple((parse_hook(n, self.cfg.n_layers), fn) for n, fn in sorted(splice.items()))
