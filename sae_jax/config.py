"""Frozen, validated configuration dataclasses, one per concern.

Each config validates itself in ``__post_init__`` (raising :class:`sae_jax.errors.ConfigError`
with a one-line message) and round-trips through JSON with ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from sae_jax.errors import ConfigError

NORMALIZATIONS = ("none", "unit_norm", "expected_norm")
DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "cosine")
ENCODER_INITS = ("auto", "data", "linear", "linear_fit", "tied")  # "auto": data on TopK, else linear
AUXK_IMPLS = ("auto", "sparse", "dense")
KERNELS = ("auto", "xla", "pallas")  # "auto": per platform, kernels.sparse_ops.resolve_kernels


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


class _JsonMixin:
  """to_dict / from_dict / JSON helpers shared by the config dataclasses."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    _check(not unknown, f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**d)

  @classmethod
  def from_json(cls, s: str):
    return cls.from_dict(json.loads(s))

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SAEConfig(_JsonMixin):
  """What an SAE is (independent of how it is trained).

  Attributes:
    architecture: a registered architecture name (``topk``, ``batchtopk``, ``jumprelu``,
      ``relu``); checked, with its ``options``, when the architecture is looked up
      (``sj.saes.registry.get``).
    d_in: width D of the activations it reads.
    d_sae: number of latents M.
    k: active latents per token (topk; mean per token for batchtopk; for the dense
      architectures only the width of the top-k view returned by ``SAE.encode``; may be None).
    normalize: input normalisation: ``none``; ``unit_norm`` (each token scaled to L2 norm 1,
      the paper's); ``expected_norm`` (one factor so the average norm is sqrt(d_in), estimated
      from the first batch).
    param_dtype: dtype parameters are stored and updated in.
    compute_dtype: dtype of the encoder/decoder matmul inputs (accumulation, losses and
      statistics stay float32).
    options: the architecture's own settings, by name (e.g. batchtopk ``cap``, jumprelu
      ``bandwidth``, relu ``l1_coefficient``); unset ones take the architecture's defaults.
      Stored as sorted (name, value) pairs so the config stays hashable; a dict is accepted.
  """

  architecture: str = "topk"
  d_in: int = 512
  d_sae: int = 8192
  k: int | None = 32
  normalize: str = "none"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  options: tuple[tuple[str, Any], ...] = ()

  # Fields of SAEConfig / TrainConfig before architecture options existed, with their old
  # defaults: an old file's value moves into ``options`` unless it is that default.
  LEGACY_OPTIONS: ClassVar[dict[str, tuple[str, str, Any]]] = {
      "batchtopk_cap": ("batchtopk", "cap", 4),
      "jumprelu_init_threshold": ("jumprelu", "init_threshold", 0.001),
      "jumprelu_bandwidth": ("jumprelu", "bandwidth", 0.001),
      "l0_coefficient": ("jumprelu", "l0_coefficient", 1e-3),
      "l1_coefficient": ("relu", "l1_coefficient", 5.0),
  }

  def __post_init__(self):
    _check(isinstance(self.architecture, str) and bool(self.architecture),
           f"architecture={self.architecture!r} must be a non-empty name")
    _check(isinstance(self.d_in, int) and self.d_in >= 1, f"d_in={self.d_in!r} must be an int >= 1")
    _check(isinstance(self.d_sae, int) and self.d_sae >= 1,
           f"d_sae={self.d_sae!r} must be an int >= 1")
    # k <= d_sae is the architecture's check (registry.check): a trace's SAE template gets its
    # d_sae from the model only later, so the template's own d_sae says nothing.
    _check(self.k is None or (isinstance(self.k, int) and self.k >= 1),
           f"k={self.k!r} must be None or an int >= 1")
    _check(self.normalize in NORMALIZATIONS,
           f"normalize={self.normalize!r}; allowed: {list(NORMALIZATIONS)}")
    _check(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r}; allowed: {list(DTYPES)}")
    _check(self.compute_dtype in DTYPES,
           f"compute_dtype={self.compute_dtype!r}; allowed: {list(DTYPES)}")
    options = self.options
    if isinstance(options, dict) or hasattr(options, "items"):
      options = tuple(options.items())
    try:
      options = tuple(sorted((str(k), v) for k, v in options))
    except (TypeError, ValueError):
      raise ConfigError(f"options={self.options!r} must be a dict of name -> value") from None
    object.__setattr__(self, "options", options)

  def option_dict(self) -> dict[str, Any]:
    return dict(self.options)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["options"] = self.option_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    d, moved = _split_legacy_options(d)
    if moved:
      d["options"] = {**moved.get(d.get("architecture", "topk"), {}), **dict(d.get("options", {}))}
    return super().from_dict(d)


def _split_legacy_options(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
  """Pull the pre-options architecture fields out of ``d``: {architecture: {option: value}}
  of those that differ from their old default."""
  d, moved = dict(d), {}
  for old, (arch, name, default) in SAEConfig.LEGACY_OPTIONS.items():
    if old in d:
      value = d.pop(old)
      if value != default:
        moved.setdefault(arch, {})[name] = value
  return d, moved


@dataclasses.dataclass(frozen=True)
class OptimConfig(_JsonMixin):
  """Adam and its learning-rate schedule.

  Attributes:
    lr: Adam learning rate; None means 2e-4 / sqrt(d_sae / 2**14) (Gao et al.'s scaling).
    lr_schedule: ``constant`` (the paper's) or ``cosine`` decay to ``lr * lr_end_ratio``.
    lr_end_ratio: the cosine schedule's final fraction of ``lr``.
    warmup_steps: linear warm-up steps from 0 (the paper: 1000).
    adam_b1, adam_b2, adam_eps: Adam hyper-parameters (the paper: eps 6.25e-10).
  """

  lr: float | None = None
  lr_schedule: str = "constant"
  lr_end_ratio: float = 0.0
  warmup_steps: int = 1000
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 6.25e-10

  def __post_init__(self):
    _check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
           f"lr={self.lr!r} must be > 0 or None")
    _check(self.lr_schedule in LR_SCHEDULES,
           f"lr_schedule={self.lr_schedule!r}; allowed: {list(LR_SCHEDULES)}")
    _check(0.0 <= self.lr_end_ratio <= 1.0, f"lr_end_ratio={self.lr_end_ratio} must be in [0, 1]")
    _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
    _check(0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1,
           f"adam_b1={self.adam_b1}, adam_b2={self.adam_b2} must be in [0, 1)")
    _check(self.adam_eps > 0, f"adam_eps={self.adam_eps} must be > 0")

  def learning_rate(self, d_sae: int) -> float:
    """The configured lr, or Gao et al.'s 2e-4 / sqrt(d_sae / 2**14)."""
    return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


@dataclasses.dataclass(frozen=True)
class RunConfig(_JsonMixin):
  """How a run is kept: logging, evaluation cadence, checkpoints, the NaN budget. None of these
  changes what is computed, so a restart may change any of them.

  Attributes:
    log_every: steps between progress lines and metric records.
    checkpoint_every: steps between Orbax checkpoints (with a workdir).
    keep_checkpoints: how many recent checkpoints to keep.
    eval_every: steps between evaluations on the held-out tokens (0: only at the end).
    max_nan_batches: the run stops with an error after this many non-finite batches.
  """

  log_every: int = 100
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  eval_every: int = 1000
  max_nan_batches: int = 10

  def __post_init__(self):
    _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
    _check(self.checkpoint_every >= 1, f"checkpoint_every={self.checkpoint_every} must be >= 1")
    _check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
    _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
    _check(self.max_nan_batches >= 0, f"max_nan_batches={self.max_nan_batches} must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_JsonMixin):
  """How an SAE is trained: the token stream, the loss, and (nested) the optimiser and how the
  run is kept.

  Attributes:
    batch_size: tokens per optimizer step (the paper: 32768).
    total_tokens: stop after this many tokens (None: one pass over the data).
    seed: parameter init and data shuffling seed.
    shuffle_batches: an iterable source is shuffled within buffers of this many batches.
    eval_tokens: tokens held out of the training data for evaluation (0: none).
    aux_k: AuxK latents per token among dead latents; None means d_in // 2; 0 disables AuxK.
    auxk_coef: weight of the AuxK loss (Gao et al.: 1/32).
    dead_tokens: a latent is dead after this many tokens without firing (Gao et al.: 10M).
    geometric_median_iters: Weiszfeld iterations for the b_dec initialisation.
    auxk_impl: the AuxK reconstruction: ``sparse`` (N * k_aux gathered rows), ``dense`` (matmuls
      over a block of the dead latents; unsharded latents only) or ``auto`` (dense on GPU/TPU
      when k_aux is at least 1/64 of that block; else, and whenever latents are sharded, sparse).
    encoder_init: ``auto`` (the default: ``data`` on TopK, else ``linear``), ``data`` (TopK:
      min(n, d_sae) latents along first-batch tokens less b_dec, W_enc scaled toward the first
      batch's fit), ``linear`` (the paper's and sparsify's: W_enc a default linear layer, decoder
      a unit copy), ``linear_fit`` (TopK), ``tied``; experiments/benchmarks/quality_note.md.
    kernels: the TopK step's sparse parts: ``xla`` (gathers, scatter-adds), ``pallas`` (Triton on
      GPU, Mosaic on TPU, interpreted elsewhere) or ``auto`` (the default: pallas on a GPU, where
      it measured faster on an H200, else xla). Same results up to float32 summation order.
    update_blocks: B > 1 (TopK): the update runs over B blocks of each chip's latents, so only
      one block's gradients are ever in memory (train/blockwise.py); 1: whole arrays at once.
    lazy_updates: TopK: a latent no token selected (nor AuxK trained) keeps its parameters this
      step, not moved further out of the top-k by Adam's momentum (quality_note.md).
    optim: Adam and the learning-rate schedule (:class:`OptimConfig`).
    run: logging, evaluation and checkpoint cadence (:class:`RunConfig`).
  """

  batch_size: int = 4096
  total_tokens: int | None = None
  seed: int = 0
  shuffle_batches: int = 8
  eval_tokens: int = 0
  aux_k: int | None = None
  auxk_coef: float = 1.0 / 32.0
  dead_tokens: int = 10_000_000
  geometric_median_iters: int = 50
  auxk_impl: str = "auto"
  encoder_init: str = "auto"
  kernels: str = "auto"
  update_blocks: int = 1
  lazy_updates: bool = True
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)

  # Fields a restart may change: they change no result, or only the order of float sums.
  RESTART_SAFE: ClassVar[tuple[str, ...]] = ("run", "auxk_impl", "kernels", "update_blocks")
  # Fields of the shared token stream: equal across the SAEs trained side by side on it.
  STREAM_FIELDS: ClassVar[tuple[str, ...]] = (
      "batch_size", "total_tokens", "seed", "shuffle_batches", "eval_tokens")

  def __post_init__(self):
    _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
           f"batch_size={self.batch_size!r} must be an int >= 1")
    _check(self.total_tokens is None or self.total_tokens >= 1,
           f"total_tokens={self.total_tokens!r} must be >= 1 or None")
    _check(self.aux_k is None or self.aux_k >= 0, f"aux_k={self.aux_k} must be >= 0 or None")
    _check(self.auxk_coef >= 0, f"auxk_coef={self.auxk_coef} must be >= 0")
    _check(self.dead_tokens >= 1, f"dead_tokens={self.dead_tokens} must be >= 1")
    _check(self.shuffle_batches >= 1, f"shuffle_batches={self.shuffle_batches} must be >= 1")
    _check(self.eval_tokens >= 0, f"eval_tokens={self.eval_tokens} must be >= 0")
    _check(self.auxk_impl in AUXK_IMPLS,
           f"auxk_impl={self.auxk_impl!r}; allowed: {list(AUXK_IMPLS)}")
    _check(self.encoder_init in ENCODER_INITS,
           f"encoder_init={self.encoder_init!r}; allowed: {list(ENCODER_INITS)}")
    _check(self.kernels in KERNELS, f"kernels={self.kernels!r}; allowed: {list(KERNELS)}")
    _check(isinstance(self.update_blocks, int) and self.update_blocks >= 1,
           f"update_blocks={self.update_blocks!r} must be an int >= 1")
    _check(isinstance(self.optim, OptimConfig), f"optim={self.optim!r} must be an OptimConfig")
    _check(isinstance(self.run, RunConfig), f"run={self.run!r} must be a RunConfig")

  def resolved_aux_k(self, d_in: int, d_sae: int) -> int:
    """AuxK width: the configured value, or d_in // 2, never more than d_sae."""
    aux_k = d_in // 2 if self.aux_k is None else self.aux_k
    return min(aux_k, d_sae)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    """From JSON. A flat pre-split dict (``lr``, ... at the top) records a ``tied`` encoder init,
    one without ``lazy_updates`` plain Adam updates (the defaults then)."""
    d = dict(d)
    if "optim" not in d and "encoder_init" not in d:
      d["encoder_init"] = "tied"
    d.setdefault("lazy_updates", False)
    d, _ = _split_legacy_options(d)  # penalties moved to the SAE's options (see SAEConfig)
    d = _nest(d, "optim", OptimConfig)
    d = _nest(d, "run", RunConfig)
    return super().from_dict(d)


def _nest(d: dict[str, Any], key: str, sub) -> dict[str, Any]:
  """Move ``sub``'s fields found at the top of ``d`` (an older flat layout) under ``d[key]``
  and build ``sub`` from the result."""
  d = dict(d)
  names = {f.name for f in dataclasses.fields(sub)}
  inner = dict(d.pop(key, None) or {}) if not isinstance(d.get(key), sub) else None
  if inner is None:
    return d
  for name in sorted(names & set(d)):
    inner.setdefault(name, d.pop(name))
  d[key] = sub.from_dict(inner)
  return d


@dataclasses.dataclass(frozen=True)
class MeshConfig(_JsonMixin):
  """The device mesh: axes ("data", "model"); -1 means "all remaining devices".

  Attributes:
    data: devices along the token (batch) axis.
    model: devices along the latent axis (W_enc columns, W_dec rows).
    devices: the mesh spans the first ``devices`` devices (one process only); 0: every device.
  """

  AXES: ClassVar[tuple[str, str]] = ("data", "model")
  data: int = -1
  model: int = 1
  devices: int = 0

  def __post_init__(self):
    _check(self.devices >= 0, f"mesh devices={self.devices} must be >= 0 (0: every device)")
    _check(self.data == -1 or self.data >= 1, f"mesh data={self.data} must be >= 1 or -1")
    _check(self.model == -1 or self.model >= 1, f"mesh model={self.model} must be >= 1 or -1")
    _check(not (self.data == -1 and self.model == -1),
           "mesh data and model cannot both be -1; set one of them")


DATA_SOURCES = ("toy", "hf")
DATA_MODES = ("truncate", "pack")


@dataclasses.dataclass(frozen=True)
class DataConfig(_JsonMixin):
  """Where text comes from and how it becomes token batches.

  Attributes:
    source: ``toy`` (the built-in world; ``path`` is the toy checkpoint directory) or ``hf``
      (a ``datasets`` dataset: a hub name, or local files by extension: txt/json/jsonl/parquet/
      arrow/csv).
    path: the dataset name, a local file / glob, or the toy directory; or several of them
      (a tuple: e.g. a Japanese and an English Wikipedia), read side by side, their documents
      interleaved one from each in turn (``max_docs`` split evenly between them).
    source_languages: with several paths, the ``language`` of each one's documents (e.g.
      ``("ja", "en")``), recorded as if it were a metadata column.
    balance: with several paths, keep the same number of documents of each (the smallest
      count after ``min_tokens`` filtering), in training and evaluation alike (the paper's
      50/50 ja/en mix).
    name: the dataset configuration (e.g. a Wikipedia language/date), if any.
    split: the split to read.
    text_field: the column holding the text.
    meta_fields: columns carried per document (e.g. ``language``).
    ctx_len: tokens per sequence, BOS included (the paper: BOS + the first 64 tokens).
    mode: ``truncate`` (first ctx_len tokens of each document) or ``pack`` (documents joined).
    min_tokens: documents shorter than this (after tokenising) are dropped.
    max_docs: read at most this many documents (None: all).
    batch_size: sequences per model forward.
    buffer_batches: forward batches mixed together before the SAE sees their tokens.
    seed: shuffling seed.
    streaming: stream a hub dataset instead of downloading it whole.
  """

  source: str = "toy"
  path: str = ""
  name: str | None = None
  split: str = "train"
  text_field: str = "text"
  meta_fields: tuple[str, ...] = ()
  ctx_len: int = 64
  mode: str = "truncate"
  min_tokens: int = 2
  max_docs: int | None = None
  batch_size: int = 32
  buffer_batches: int = 16
  seed: int = 0
  streaming: bool = False
  source_languages: tuple[str, ...] = ()
  balance: bool = False

  def __post_init__(self):
    if not isinstance(self.path, str):  # several sources; one in a tuple is just that one
      paths = tuple(str(p) for p in self.path)
      object.__setattr__(self, "path", paths[0] if len(paths) == 1 else paths)
    object.__setattr__(self, "source_languages", _as_tuple(self.source_languages))
    n = len(self.paths)
    _check(not self.source_languages or len(self.source_languages) == n,
           f"source_languages={self.source_languages!r} must name one language per path "
           f"({n} path(s))")
    _check(n == 1 or self.source == "hf", f"data source={self.source!r} reads one path; got {n}")
    _check(self.source in DATA_SOURCES, f"data source={self.source!r}; allowed: {list(DATA_SOURCES)}")
    _check(self.mode in DATA_MODES, f"data mode={self.mode!r}; allowed: {list(DATA_MODES)}")
    _check(self.ctx_len >= 2, f"ctx_len={self.ctx_len} must be >= 2")
    _check(self.min_tokens >= 1, f"min_tokens={self.min_tokens} must be >= 1")
    _check(self.max_docs is None or self.max_docs >= 1, f"max_docs={self.max_docs} must be >= 1")
    _check(self.batch_size >= 1, f"data batch_size={self.batch_size} must be >= 1")
    _check(self.buffer_batches >= 1, f"buffer_batches={self.buffer_batches} must be >= 1")
    object.__setattr__(self, "meta_fields", tuple(self.meta_fields))

  @property
  def paths(self) -> tuple[str, ...]:
    """The source paths (one, or several read side by side)."""
    return (self.path,) if isinstance(self.path, str) else self.path


def _as_tuple(value) -> tuple:
  """A lone string (``--config.hooks=resid_post.3``) is one item, not its letters."""
  return (value,) if isinstance(value, str) else tuple(value)
