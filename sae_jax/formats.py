"""SAE files: our own format, and export/import of SAELens, sparsify and llm-jp-sae.

| format       | files                                   | tensors (our names)                          |
|--------------|-----------------------------------------|----------------------------------------------|
| ``sae_jax``  | cfg.json (format: sae_jax) + sae.safetensors | W_enc [D,M] b_enc W_dec [M,D] b_dec (+log_threshold) |
| ``sae_lens`` | cfg.json + sae_weights.safetensors (v6)  | W_enc b_enc W_dec b_dec (+threshold)          |
| ``sparsify`` | cfg.json + sae.safetensors               | encoder.weight = W_enc^T, encoder.bias, W_dec, b_dec |
| ``llm_jp_sae`` | config.json (model_type topk_sae) + model.safetensors | encoder.weight = W_enc^T, encoder.bias, decoder.weight = W_dec^T, b_dec |
| ``llm_jp_sae_v1`` (read only) | config.json (d_in, expansion_factor, k) + model.safetensors | encoder.weight = W_enc^T, encoder.bias, W_dec, b_dec (often bfloat16) |

Input normalisation: SAELens and sparsify get a constant factor (``expected_norm``) folded into
the weights, as SAELens's ``fold_activation_norm_scaling_factor`` does; ``unit_norm`` maps to
SAELens's ``constant_norm_rescale`` (norm sqrt(d_in) per token, folded by 1/sqrt(d_in)) and is
the llm-jp-sae format's own convention. Pickle files are refused without being opened.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax import paths
from sae_jax.config import SAEConfig
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.saes import registry
from sae_jax.saes.sae import SAE, WRITERS
from sae_jax.store import atomic_dir, atomic_write_json, read_json
from sae_jax.version import __version__ as _version

FORMATS = ("sae_jax", "sae_lens", "sparsify", "llm_jp_sae")
# Formats read but never written: the paper's released v1 SAEs (llm-jp-sae at d9eb8c6).
READ_ONLY_FORMATS = ("llm_jp_sae_v1",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SAELENS_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu"}


def _np(sae: SAE) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float32) for k, v in sae.params.items()}


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy. A file with bfloat16 tensors (numpy has no
  such dtype: the paper's v1 SAEs) is read through JAX and widened to float32 exactly."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  try:
    with paths.local_file(path) as local:  # a bucket's file: through a local temporary copy
      try:
        return load_file(local)
      except TypeError:  # "data type 'bfloat16' not understood"
        with safe_open(local, framework="flax") as f:
          tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: np.asarray(t.astype(jnp.float32) if t.dtype == jnp.bfloat16 else t)
            for k, t in tensors.items()}
  except Exception as e:  # safetensors raises several types for damaged files
    raise CheckpointError(f"cannot read SAE weights {path}: {e}") from None


def _expect(tensors: dict, name: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
  if name not in tensors:
    raise CheckpointError(f"{where} has no tensor {name!r}; found {sorted(tensors)}")
  t = tensors[name]
  if tuple(t.shape) != shape:
    raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
  return t.astype(np.float32)


def _fold(p: dict[str, np.ndarray], c: float) -> dict[str, np.ndarray]:
  """Weights that take raw x where ours take c * x (same codes, same reconstruction of x)."""
  out = dict(p)
  out["W_enc"] = p["W_enc"] * c
  out["W_dec"] = p["W_dec"] / c
  out["b_dec"] = p["b_dec"] / c
  return out


def _make(cfg: SAEConfig, params: dict[str, np.ndarray], buffers: dict[str, float] | None = None,
          metadata: dict | None = None) -> SAE:
  bufs = {k: jnp.asarray(v) for k, v in registry.get(cfg.architecture).init_buffers(cfg).items()}
  for k, v in (buffers or {}).items():
    bufs[k] = jnp.float32(v)
  dtype = jnp.dtype(cfg.param_dtype)
  return SAE(cfg, {k: jnp.asarray(v, dtype) for k, v in params.items()}, bufs,
             dict(metadata or {}))


# ---- our own format -------------------------------------------------------------------------


def save_native(sae: SAE, path: str | os.PathLike) -> None:
  """cfg.json (config, buffers, provenance) + sae.safetensors, written atomically."""
  with atomic_dir(path) as tmp:
    _save_tensors(tmp / "sae.safetensors", _np(sae))
    atomic_write_json(tmp / "cfg.json", {
        "format": "sae_jax", "sae_jax_version": _version, "sae": sae.cfg.to_dict(),
        "buffers": {k: float(v) for k, v in sae.buffers.items()},
        "metadata": sae.metadata})


def _load_native(path: Path, cfg_json: dict) -> SAE:
  try:
    cfg = SAEConfig.from_dict(cfg_json["sae"])
  except (KeyError, TypeError, ConfigError) as e:
    raise CheckpointError(f"{path / 'cfg.json'} holds no valid SAE config: {e}") from None
  t = _load_tensors(path / "sae.safetensors")
  d, m = cfg.d_in, cfg.d_sae
  shapes = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,),
            "log_threshold": (m,)}
  names = registry.get(cfg.architecture).param_names()
  params = {n: _expect(t, n, shapes[n], path / "sae.safetensors") for n in names}
  return _make(cfg, params, cfg_json.get("buffers"), cfg_json.get("metadata"))


# ---- SAELens --------------------------------------------------------------------------------


def export_sae_lens(sae: SAE, path: str | os.PathLike) -> None:
  """SAELens v6 layout; load with ``sae_lens.SAE.load_from_disk(path)``."""
  cfg, p = sae.cfg, _np(sae)
  norm = "none"
  if cfg.normalize == "expected_norm":
    p = _fold(p, float(sae.buffers["norm_scale"]))
  elif cfg.normalize == "unit_norm":
    p = _fold(p, 1.0 / math.sqrt(cfg.d_in))
    norm = "constant_norm_rescale"
  tensors = {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
  arch = _SAELENS_ARCH[cfg.architecture]
  if cfg.architecture == "jumprelu":
    tensors["threshold"] = np.exp(p["log_threshold"])
  elif cfg.architecture == "batchtopk":
    # Inference is a JumpReLU with one shared threshold (0 reduces to ReLU).
    tensors["threshold"] = np.full((cfg.d_sae,), float(sae.buffers["threshold"]), np.float32)
  meta = {k: v for k, v in sae.metadata.items() if k in ("model_name", "hook_name")}
  meta["sae_jax_version"] = _version
  out = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
         "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": norm,
         "reshape_activations": "none", "metadata": meta}
  if arch == "topk":
    out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
  with atomic_dir(path) as tmp:
    _save_tensors(tmp / "sae_weights.safetensors", tensors)
    atomic_write_json(tmp / "cfg.json", out)


def _load_sae_lens(path: Path, c: dict) -> SAE:
  arch = c.get("architecture", "standard")
  allowed = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}
  if arch not in allowed:
    raise CheckpointError(f"SAELens architecture {arch!r} in {path} is not supported; "
                          f"allowed: {sorted(allowed)}")
  if not c.get("apply_b_dec_to_input", True) or c.get("rescale_acts_by_decoder_norm", False):
    raise CheckpointError(f"{path}: apply_b_dec_to_input=False or rescale_acts_by_decoder_norm "
                          "is not supported")
  norm = c.get("normalize_activations", "none")
  if norm not in ("none", "constant_norm_rescale"):
    raise CheckpointError(f"{path}: normalize_activations={norm!r} is not supported; allowed: "
                          "'none', 'constant_norm_rescale' (fold other factors first)")
  d, m = int(c["d_in"]), int(c["d_sae"])
  where = path / "sae_weights.safetensors"
  t = _load_tensors(where)
  p = {"W_enc": _expect(t, "W_enc", (d, m), where), "b_enc": _expect(t, "b_enc", (m,), where),
       "W_dec": _expect(t, "W_dec", (m, d), where), "b_dec": _expect(t, "b_dec", (d,), where)}
  normalize = "none"
  if norm == "constant_norm_rescale":
    p = _fold(p, math.sqrt(d))  # undo export's 1/sqrt(d): weights for unit-norm inputs
    normalize = "unit_norm"
  if arch == "jumprelu":
    thr = _expect(t, "threshold", (m,), where)
    if np.any(thr <= 0):
      raise CheckpointError(f"{where}: JumpReLU thresholds must be > 0")
    p["log_threshold"] = np.log(thr)
  cfg = SAEConfig(architecture=allowed[arch], d_in=d, d_sae=m,
                  k=int(c["k"]) if arch == "topk" else None, normalize=normalize)
  return _make(cfg, p, metadata={"imported_from": "sae_lens", **c.get("metadata", {})})


# ---- sparsify -------------------------------------------------------------------------------


def export_sparsify(sae: SAE, path: str | os.PathLike) -> None:
  """EleutherAI sparsify layout; load with ``SparseCoder.load_from_disk(path)``."""
  cfg, p = sae.cfg, _np(sae)
  if cfg.architecture != "topk":
    raise ConfigError(f"sparsify stores TopK SAEs only; this SAE is {cfg.architecture!r}")
  if cfg.normalize == "unit_norm":
    raise ConfigError("sparsify has no per-token input normalisation; export a unit_norm SAE "
                      "as 'sae_lens' or 'llm_jp_sae'")
  if cfg.normalize == "expected_norm":
    p = _fold(p, float(sae.buffers["norm_scale"]))
  tensors = {"encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"], "W_dec": p["W_dec"],
             "b_dec": p["b_dec"]}
  out = {"activation": "topk", "expansion_factor": max(cfg.d_sae // cfg.d_in, 1),
         "normalize_decoder": True, "num_latents": cfg.d_sae, "k": cfg.k,
         "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
  with atomic_dir(path) as tmp:
    _save_tensors(tmp / "sae.safetensors", tensors)
    atomic_write_json(tmp / "cfg.json", out)


def _load_sparsify(path: Path, c: dict) -> SAE:
  if c.get("activation", "topk") != "topk" or c.get("skip_connection") or c.get("transcode"):
    raise CheckpointError(f"{path}: only sparsify TopK autoencoders (no skip connection, not "
                          "transcoders) are supported")
  d = int(c["d_in"])
  m = int(c.get("num_latents") or c["expansion_factor"] * d)
  where = path / "sae.safetensors"
  t = _load_tensors(where)
  p = {"W_enc": _expect(t, "encoder.weight", (m, d), where).T,
       "b_enc": _expect(t, "encoder.bias", (m,), where),
       "W_dec": _expect(t, "W_dec", (m, d), where), "b_dec": _expect(t, "b_dec", (d,), where)}
  cfg = SAEConfig(architecture="topk", d_in=d, d_sae=m, k=int(c["k"]))
  return _make(cfg, p, metadata={"imported_from": "sparsify"})


# ---- llm-jp-sae (the paper's released format) -----------------------------------------------


def export_llm_jp_sae(sae: SAE, path: str | os.PathLike) -> None:
  """The paper's ``transformers`` layout: config.json (topk_sae) + model.safetensors."""
  cfg, p = sae.cfg, _np(sae)
  if cfg.architecture != "topk" or cfg.normalize != "unit_norm":
    raise ConfigError("llm-jp-sae stores TopK SAEs on unit-norm inputs; this SAE is "
                      f"{cfg.architecture!r} with normalize={cfg.normalize!r}")
  tensors = {"encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"],
             "decoder.weight": p["W_dec"].T, "b_dec": p["b_dec"]}
  out = {"model_type": "topk_sae", "architectures": ["TopKSAE"], "d_in": cfg.d_in,
         "num_latents": cfg.d_sae, "k": cfg.k, "torch_dtype": "float32"}
  with atomic_dir(path) as tmp:
    _save_tensors(tmp / "model.safetensors", tensors)
    atomic_write_json(tmp / "config.json", out)


def _llm_jp_sae(path: Path, d: int, m: int, k: int, version: str) -> SAE:
  """A TopK SAE on unit-norm inputs from ``model.safetensors``, in either llm-jp-sae layout:
  ``llm_jp_sae`` holds decoder.weight = W_dec^T [D, M], ``llm_jp_sae_v1`` W_dec [M, D]."""
  where = path / "model.safetensors"
  if not where.exists():
    _refuse_pickles(path)
    raise CheckpointError(f"{path} has an {version} config.json but no model.safetensors")
  t = _load_tensors(where)
  w_dec = (_expect(t, "W_dec", (m, d), where) if version == "llm_jp_sae_v1"
           else _expect(t, "decoder.weight", (d, m), where).T)
  p = {"W_enc": _expect(t, "encoder.weight", (m, d), where).T,
       "b_enc": _expect(t, "encoder.bias", (m,), where), "W_dec": w_dec,
       "b_dec": _expect(t, "b_dec", (d,), where)}
  cfg = SAEConfig(architecture="topk", d_in=d, d_sae=m, k=k, normalize="unit_norm")
  return _make(cfg, p, metadata={"imported_from": version})


def _load_llm_jp_sae(path: Path, c: dict) -> SAE:
  return _llm_jp_sae(path, int(c["d_in"]), int(c["num_latents"]), int(c["k"]), "llm_jp_sae")


def _is_llm_jp_sae_v1(c: dict) -> bool:
  """The paper's v1 ``SparseAutoEncoder`` (a transformers PreTrainedModel): its config holds
  d_in, expansion_factor and k."""
  return {"d_in", "expansion_factor", "k"} <= set(c) and c.get("model_type") != "topk_sae"


def _load_llm_jp_sae_v1(path: Path, c: dict) -> SAE:
  """The v1 layout: encoder.weight [M, D], encoder.bias [M], W_dec [M, D], b_dec [D], usually
  bfloat16 (read exactly, then held as float32). Inputs are unit-norm (the paper's "Scalar")."""
  d = int(c["d_in"])
  sae = _llm_jp_sae(path, d, d * int(c["expansion_factor"]), int(c["k"]), "llm_jp_sae_v1")
  sae.metadata["stored_dtype"] = str(c.get("torch_dtype", "float32"))
  return sae


# ---- dispatch -------------------------------------------------------------------------------

# SAE.save / SAE.export write through this table (sae.py needs nothing of the formats).
WRITERS.update({"sae_jax": save_native, "sae_lens": export_sae_lens,
                "sparsify": export_sparsify, "llm_jp_sae": export_llm_jp_sae})
assert tuple(WRITERS) == FORMATS


def check_formats(formats) -> None:
  """Raise ConfigError naming any format that is not one of FORMATS."""
  bad = [f for f in formats if f not in FORMATS]
  if bad:
    raise ConfigError(f"unknown export format(s) {bad}; allowed: {list(FORMATS)}")


def _refuse_pickles(path: Path) -> None:
  found = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if found:
    raise CheckpointError(f"{path} holds only pickle weights {found}; sae_jax never unpickles "
                          "(it can run code). Convert them to safetensors first")


def detect_format(path: str | os.PathLike) -> str:
  """Which of FORMATS the SAE directory ``path`` is in (CheckpointError if none)."""
  path = paths.as_path(path)
  if path.is_file():
    if path.suffix in PICKLE_SUFFIXES:
      raise CheckpointError(f"{path} is a pickle file; sae_jax never unpickles (it can run "
                            "code). Convert it to safetensors first")
    path = path.parent
  if not path.is_dir():
    raise CheckpointError(f"no SAE at {path}: not a directory")
  cfg_path, hf_path = path / "cfg.json", path / "config.json"
  if cfg_path.exists():
    c = read_json(cfg_path)
    if not isinstance(c, dict):
      raise CheckpointError(f"{cfg_path} is not a JSON object")
    if c.get("format") == "sae_jax":
      return "sae_jax"
    if (path / "sae_weights.safetensors").exists():
      return "sae_lens"
    if (path / "sae.safetensors").exists() and ("num_latents" in c or "activation" in c):
      return "sparsify"
  if hf_path.exists() and read_json(hf_path).get("model_type") == "topk_sae":
    return "llm_jp_sae"
  if hf_path.exists() and _is_llm_jp_sae_v1(read_json(hf_path)):
    return "llm_jp_sae_v1"
  _refuse_pickles(path)
  raise CheckpointError(f"no SAE recognised in {path} (found {sorted(p.name for p in path.iterdir())});"
                        f" readable formats: {list(FORMATS + READ_ONLY_FORMATS)}")


def load_sae(path: str | os.PathLike) -> SAE:
  """Load an SAE directory written by sae_jax, SAELens, sparsify or llm-jp-sae."""
  fmt = detect_format(path)
  path = paths.as_path(path)
  if path.is_file():
    path = path.parent
  try:
    if fmt == "llm_jp_sae":
      return _load_llm_jp_sae(path, read_json(path / "config.json"))
    if fmt == "llm_jp_sae_v1":
      return _load_llm_jp_sae_v1(path, read_json(path / "config.json"))
    c = read_json(path / "cfg.json")
    return {"sae_jax": _load_native, "sae_lens": _load_sae_lens,
            "sparsify": _load_sparsify}[fmt](path, c)
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, (CheckpointError, ConfigError)):
      raise
    raise CheckpointError(f"{path} ({fmt}): malformed config: {e!r}") from None
