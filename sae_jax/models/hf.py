"""Load Hugging Face checkpoints (a local directory or the hub, at any revision) into our ports.

``config.json`` is checked against the family's allow-list (anything not implemented raises,
naming the field) and, given a mesh, against the mesh (tensor parallelism must split the heads
and the MLP evenly); the module is built from shapes alone (``nnx.eval_shape``), its parameter
paths being the checkpoint's names, and every tensor's name and shape is checked against it
before any weight is read. Then each tensor is read once on the host (memory-mapped
safetensors) and placed straight into its shards (``jax.make_array_from_callback``: each
device receives only its slice). PyTorch ``.bin`` files are read only with
``torch.load(weights_only=True)``; ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sae_jax import paths, sharding
from sae_jax.errors import CheckpointError, UnsupportedModelError
from sae_jax.models import gpt2, gpt_neox, llama
from sae_jax.models.base import CausalLM, TransformerConfig, param_name
from sae_jax.models.layers import axes_of

FAMILIES = {t: m for m in (llama, gpt_neox, gpt2) for t in m.MODEL_TYPES}
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve(name_or_dir: str | os.PathLike, revision: str | None = None) -> Path:
  """A local directory holding config.json for ``name_or_dir`` at ``revision``.

  Local: the directory itself, or its subdirectory named ``revision`` (one directory per
  revision, as the toy world writes them). Otherwise a hub repo id, fetched (or found in the
  local cache when HF_HUB_OFFLINE=1) with huggingface_hub at that revision.
  """
  path = paths.as_path(name_or_dir)
  if path.is_dir():
    if revision is not None and (path / revision).is_dir():
      path = path / revision
    elif revision is not None and revision != path.name:
      raise CheckpointError(f"revision {revision!r} not found under {path}; found "
                            f"{sorted(p.name for p in path.iterdir() if p.is_dir())}")
    if not (path / "config.json").exists():
      raise CheckpointError(f"{path} has no config.json")
    return paths.local_dir(path)  # a bucket's checkpoint: through a temporary local copy
  if path.exists():
    raise CheckpointError(f"{path} is a file; pass a model directory or a hub repo id")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(name_or_dir), revision=revision, allow_patterns=_PATTERNS))
  except Exception as e:  # offline, missing repo or revision: one line either way
    kind = type(e).__name__
    raise CheckpointError(f"cannot get {name_or_dir!r} at revision {revision or 'main'!r} "
                          f"({kind}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def read_config(path: Path) -> tuple[object, TransformerConfig]:
  """The family module and our config for the checkpoint in ``path``."""
  try:
    d = json.loads((path / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
  mt = d.get("model_type")
  if mt not in FAMILIES:
    raise UnsupportedModelError(f"model_type {mt!r} is not supported; allowed: "
                                f"{sorted(FAMILIES)}")
  family = FAMILIES[mt]
  try:
    return family, family.config_from_hf(d)
  except KeyError as e:
    raise CheckpointError(f"{path / 'config.json'} lacks the field {e.args[0]!r}") from None


class _TensorSource:
  """Tensors by name from safetensors (single or sharded) or, with torch, a .bin file."""

  def __init__(self, path: Path):
    self.path = path
    self._where: dict[str, Path] = {}
    index = path / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self._where = {k: path / v for k, v in weight_map.items()}
    else:
      files = sorted(path.glob("*.safetensors"))
      if files:
        from safetensors import safe_open
        for f in files:
          with safe_open(str(f), "numpy") as h:
            self._where.update({k: f for k in h.keys()})
      else:
        self._torch = self._load_bin()
    self._handles = {}

  def _load_bin(self) -> dict:
    bins = sorted(self.path.glob("pytorch_model*.bin"))
    if not bins:
      raise CheckpointError(f"{self.path} has no *.safetensors or pytorch_model*.bin weights")
    try:
      import torch
    except ImportError:
      raise CheckpointError(f"{self.path} has only PyTorch .bin weights; install torch (read "
                            "with weights_only=True) or convert them to safetensors") from None
    out = {}
    for b in bins:
      out.update({k: v.float().numpy() for k, v in
                  torch.load(b, map_location="cpu", weights_only=True).items()})
    self._where = {k: b for k in out}
    return out

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, read from the file's header only."""
    if hasattr(self, "_torch"):
      return tuple(self._torch[name].shape)
    return tuple(self._handle(name).get_slice(name).get_shape())

  def _handle(self, name: str):
    f = self._where[name]
    if f not in self._handles:
      from safetensors import safe_open
      self._handles[f] = safe_open(str(f), "numpy")
    return self._handles[f]

  def get(self, name: str) -> np.ndarray:
    if hasattr(self, "_torch"):
      return self._torch[name]
    try:
      return self._handle(name).get_tensor(name)
    except Exception as e:
      raise CheckpointError(f"cannot read tensor {name!r} from {self._where[name]}: {e}") from None


def _host_dtype(dtype) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))


def model_class(cfg: TransformerConfig) -> type[CausalLM]:
  """The NNX module class of the config's family (``LlamaForCausalLM``, ...)."""
  return FAMILIES[cfg.model_type].MODEL_CLASS


def check_mesh(cfg: TransformerConfig, mesh: Mesh) -> None:
  """One-line ConfigError unless tensor parallelism on ``mesh`` splits the model evenly.

  The heads, key/value heads and MLP width must divide over the mesh axis their logical names
  map to (and the width too, where "embed" is mapped); vocabulary rows that do not divide stay
  replicated.
  """
  sharding.check_logical_divisible(
      mesh, {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "mlp": cfg.d_mlp,
             "embed": cfg.d_model}, f"{cfg.model_type} model")


def load_model(name_or_dir: str | os.PathLike, revision: str | None = None, *,
               dtype: str = "float32", param_dtype: str | None = None,
               mesh: Mesh | None = None) -> CausalLM:
  """Load a causal LM checkpoint into its Flax NNX port.

  Args:
    name_or_dir: a local directory (or a directory of revision subdirectories) or a hub id.
    revision: the revision (branch, tag, commit; e.g. "step1000"); None: main / the directory.
    dtype: compute dtype of activations; param_dtype: storage dtype (default: dtype).
    mesh: place parameters sharded by the logical-axis rules (tensor parallel on "model").

  Returns:
    An ``nnx.Module`` (:class:`~sae_jax.models.base.CausalLM`: ``LlamaForCausalLM``,
    ``GPTNeoXForCausalLM`` or ``GPT2LMHeadModel``) with ``activations``, ``logits``,
    ``tokenizer``; ``nnx.split(model)`` gives its graph definition and weights.
  """
  path = resolve(name_or_dir, revision)
  _, cfg = read_config(path)
  if mesh is not None:
    check_mesh(cfg, mesh)
  pdt = _host_dtype(param_dtype or dtype)
  graphdef, abstract = abstract_model(cfg, pdt)
  flat = list(nnx.to_flat_state(abstract))
  source = _TensorSource(path)
  _check_tensors(path, source, [(param_name(p), v.shape) for p, v in flat])
  state = nnx.from_flat_state([(p, v.replace(sharding.place(source.get(param_name(p)).astype(
      pdt, copy=False), mesh, axes_of(v)))) for p, v in flat])
  model = nnx.merge(graphdef, state)
  model.path, model.revision, model.mesh = str(path), revision, mesh
  model.compute_dtype = jnp.dtype(dtype)
  return model


def _check_tensors(path: Path, source: _TensorSource, expected: list[tuple[str, tuple]]) -> None:
  """Every tensor the module holds is in the checkpoint with the module's shape."""
  available = source.names()
  for name, _ in expected:
    if name not in available:
      raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
  for name, shape in expected:
    if source.shape(name) != tuple(shape):
      raise CheckpointError(f"{path}: tensor {name!r} has shape {source.shape(name)}, expected "
                            f"{tuple(shape)}")


def abstract_model(cfg: TransformerConfig, dtype="float32", mesh: Mesh | None = None
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """The module's graph definition and its state as ShapeDtypeStructs (sharded on ``mesh`` by
  the rules), for ``jax.eval_shape`` / ahead-of-time compiles of full-size models."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, jnp.dtype(dtype))))

  def spec(v):
    sh = sharding.sharding_for_shape(mesh, axes_of(v), v.shape) if mesh is not None else None
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh))

  return graphdef, nnx.from_flat_state([(p, spec(v)) for p, v in nnx.to_flat_state(abstract)])

