"""What every family plugs into: the config, the hook-driven forward, the NNX module base.

A family module (``llama.py``, ``gpt_neox.py``, ``gpt2.py``) provides ``config_from_hf`` and a
:class:`CausalLM` subclass whose attribute paths are the checkpoint's tensor names
(``model.layers[3].self_attn.q_proj.weight`` holds ``model.layers.3.self_attn.q_proj.weight``)
with ``embed`` / ``layers`` / ``unembed``. The forward here runs only the blocks the requested
hooks need and can replace the activation at any hook by a function of it (the splice used for
CE-loss-recovered evaluation).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
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


def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, mask: jax.Array,
            capture: tuple[Hook, ...], splice: tuple[tuple[Hook, Callable], ...], logits: bool,
            compute_dtype, splice_args: tuple = ()):
  """Run the model ``nnx.merge(graphdef, state)`` up to what ``capture`` / ``logits`` need.

  ``splice_args``: one entry per ``splice`` entry, None or a pytree of arrays passed to that
  splice function as its second argument (traced, so it is not part of the compile key).
  Returns (dict hook name -> [B, T, D] float32, logits [B, T, V] float32 or None).
  """
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
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

  x = model.embed(input_ids, positions).astype(compute_dtype)
  layers = model.layers
  for i in range(n_blocks):  # the blocks past the deepest hook are never touched
    x = visit("resid_pre", i, x)
    x = layers[i](x, cfg, mask, positions, lambda kind, a, i=i: visit(kind, i, a))
    x = visit("resid_post", i, x)
  for h in capture:  # resid_pre of the block after the last one run
    if h.name not in out and h.kind == "resid_pre" and h.layer == n_blocks:
      out[h.name] = visit("resid_pre", h.layer, x).astype(jnp.float32)
  return out, (model.unembed(x).astype(jnp.float32) if logits else None)


@dataclasses.dataclass(frozen=True)
class Graph:
  """The compile key of a module class and config: its graph definition and state layout.

  Hashes by (class, config), cheaply: a GraphDef hashes by walking the whole graph, which would
  cost milliseconds per forward call of a large model.
  """

  cls: type
  cfg: TransformerConfig

  @property
  def graphdef(self) -> nnx.GraphDef:
    return _graph_of(self.cls, self.cfg)[0]

  @property
  def treedef(self):
    """The pytree structure of the module's ``nnx.state`` (its leaves: the weight arrays)."""
    return _graph_of(self.cls, self.cfg)[1]


@functools.lru_cache(maxsize=32)
def _graph_of(cls: type, cfg: TransformerConfig):
  """(graph definition, state treedef) of ``cls(cfg)`` as constructed, from shapes alone.

  The forward is compiled against this graph definition, not a loaded module's own: a loaded
  module also carries its checkpoint's path and revision, which must not split the cache.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg)))
  return graphdef, jax.tree.structure(state)


def graphdef_of(cls: type, cfg: TransformerConfig) -> nnx.GraphDef:
  """The graph definition every module ``cls(cfg)`` is run against (see ``_graph_of``)."""
  return _graph_of(cls, cfg)[0]


def _forward_leaves(graph: Graph, leaves: list, *args):
  return forward(graph.graphdef, jax.tree.unflatten(graph.treedef, leaves), *args)


# One compiled forward per (class and config, capture, splice, logits, dtype, input shapes and
# shardings), shared by every module of one config: the key holds the structure and the config
# but no array, the weights come in as arguments (the state's leaves), so the cache holds no
# model and no parameters, and the checkpoints of one trace (same config) compile once. The
# splice callables are part of the key, so the cache keeps each one alive with whatever it
# closes over (a closure over an SAE keeps that SAE and its weights) until
# ``_forward_jit.clear_cache()`` or ``jax.clear_caches()``; each distinct callable also compiles
# once, so reuse one per SAE. Splice functions that need arrays (an SAE's weights) take them
# through ``splice_args``.
_forward_jit = jax.jit(_forward_leaves, static_argnums=(0, 4, 5, 6, 7))

# module -> its Variables in state order, found once: walking an NNX graph costs milliseconds
# per call for a large model. Values are read at each call, so ``nnx.update`` and
# ``Variable.set_value`` are seen; replacing a submodule or Variable object is not.
_VARIABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def param_name(path: tuple) -> str:
  """An nnx state path -> the checkpoint's tensor name ("model.layers.3.mlp.up_proj.weight")."""
  return ".".join(str(p) for p in path)


def with_params(template: nnx.State, params: dict) -> nnx.State:
  """``template`` (e.g. an abstract state) with each variable's value taken from ``params``
  (checkpoint name -> array; jit-traceable)."""
  return nnx.from_flat_state([(p, v.replace(params[param_name(p)]))
                              for p, v in nnx.to_flat_state(template)])


class CausalLM(nnx.Module, abc.ABC):
  """A transformer as a Flax NNX module, with the hook API (``activations``, ``logits``).

  Attributes:
    cfg: TransformerConfig. params: checkpoint name -> array (a view of the module's state).
    path, revision: where the weights came from. mesh: the mesh they are sharded on, or None.
    compute_dtype: dtype of activations and matmul inputs (norms/softmax run in float32).
  A family subclass defines the submodules (checkpoint names), ``embed``, ``layers`` (the
  blocks, each called as ``block(x, cfg, mask, positions, visit)``) and ``unembed``.
  """

  def __init__(self, cfg: TransformerConfig):
    self.cfg = cfg
    self.path: str | None = None
    self.revision: str | None = None
    self.mesh: Mesh | None = None
    self.compute_dtype = jnp.dtype(jnp.float32)

  @abc.abstractmethod
  def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T] token ids, [B, T] positions -> [B, T, D] the first block's input."""

  @abc.abstractmethod
  def unembed(self, x: jax.Array) -> jax.Array:
    """[B, T, D] the last block's output -> [B, T, V] logits (final norm included)."""

  @property
  @abc.abstractmethod
  def layers(self) -> nnx.List:
    """The blocks, in order."""

  @property
  def params(self) -> dict[str, jax.Array]:
    """Checkpoint name -> array, in the module's state order."""
    return {param_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(self))}

  @property
  def tokenizer(self):
    """The tokenizer saved with the checkpoint (``AutoTokenizer``, no remote code)."""
    return _tokenizer(self.path)

  def hooks(self, names) -> tuple[Hook, ...]:
    return tuple(parse_hook(n, self.cfg.n_layers) for n in names)

  def _run(self, input_ids, mask, capture, splice, logits, splice_args=None):
    splice_args = tuple((splice_args or {}).get(h.name) for h, _ in splice)
    variables = _VARIABLES.get(self)
    if variables is None:
      variables = _VARIABLES[self] = tuple(jax.tree.leaves(
          nnx.state(self), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return _forward_jit(Graph(type(self), self.cfg), [v.get_raw_value() for v in variables],
                        input_ids, mask, capture, splice, logits, self.compute_dtype,
                        splice_args)

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


Model = CausalLM  # the name the rest of the package (and older code) uses for a loaded model


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str | None):
  if path is None:
    raise DataError("this model was not loaded from a checkpoint directory: it has no tokenizer")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
