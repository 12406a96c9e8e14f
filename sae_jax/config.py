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
    architecture: one of the registered names (``topk``, ``batchtopk``, ``jumprelu``, ``relu``).
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
    batchtopk_cap: batchtopk keeps at most ``batchtopk_cap * k`` latents per token at train time.
    jumprelu_init_threshold: initial JumpReLU threshold.
    jumprelu_bandwidth: width of the straight-through rectangle kernel for threshold gradients.
  """

  architecture: str = "topk"
  d_in: int = 512
  d_sae: int = 8192
  k: int | None = 32
  normalize: str = "none"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  batchtopk_cap: int = 4
  jumprelu_init_threshold: float = 0.001
  jumprelu_bandwidth: float = 0.001

  def __post_init__(self):
    from sae_jax.saes import registry  # late: the registry imports this module

    _check(self.architecture in registry.names(),
           f"unknown architecture {self.architecture!r}; allowed: {registry.names()}")
    _check(isinstance(self.d_in, int) and self.d_in >= 1, f"d_in={self.d_in!r} must be an int >= 1")
    _check(isinstance(self.d_sae, int) and self.d_sae >= 1,
           f"d_sae={self.d_sae!r} must be an int >= 1")
    arch = registry.get(self.architecture)
    if arch.needs_k or self.k is not None:
      _check(isinstance(self.k, int) and 1 <= self.k <= self.d_sae,
             f"k={self.k!r} must be an int with 1 <= k <= d_sae={self.d_sae}")
    _check(self.normalize in NORMALIZATIONS,
           f"normalize={self.normalize!r}; allowed: {list(NORMALIZATIONS)}")
    _check(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r}; allowed: {list(DTYPES)}")
    _check(self.compute_dtype in DTYPES,
           f"compute_dtype={self.compute_dtype!r}; allowed: {list(DTYPES)}")
    _check(isinstance(self.batchtopk_cap, int) and self.batchtopk_cap >= 1,
           f"batchtopk_cap={self.batchtopk_cap!r} must be an int >= 1")
    _check(self.jumprelu_init_threshold > 0,
           f"jumprelu_init_threshold={self.jumprelu_init_threshold} must be > 0")
    _check(self.jumprelu_bandwidth > 0, f"jumprelu_bandwidth={self.jumprelu_bandwidth} must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_JsonMixin):
  """How an SAE is trained.

  Attributes:
    batch_size: tokens per optimizer step (the paper: 32768).
    total_tokens: stop after this many tokens (None: one pass over the data).
    lr: Adam learning rate; None means 2e-4 / sqrt(d_sae / 2**14) (Gao et al.'s scaling).
    lr_schedule: ``constant`` (the paper's) or ``cosine`` decay to ``lr * lr_end_ratio``.
    warmup_steps: linear warm-up steps from 0 (the paper: 1000).
    adam_b1, adam_b2, adam_eps: Adam hyper-parameters (the paper: eps 6.25e-10).
    aux_k: AuxK latents per token among dead latents; None means d_in // 2; 0 disables AuxK.
    auxk_coef: weight of the AuxK loss (Gao et al.: 1/32).
    dead_tokens: a latent is dead after this many tokens without firing (Gao et al.: 10M).
    l1_coefficient: relu: weight of the L1 penalty on activations times decoder norms.
    l0_coefficient: jumprelu: weight of the L0 penalty.
    seed: parameter init and data shuffling seed.
    max_nan_batches: the run stops with an error after this many non-finite batches.
    geometric_median_iters: Weiszfeld iterations for the b_dec initialisation.
    log_every: steps between progress lines and metric records.
    checkpoint_every: steps between Orbax checkpoints (with a workdir).
    keep_checkpoints: how many recent checkpoints to keep.
    eval_every: steps between evaluations on the held-out tokens (0: only at the end).
    eval_tokens: tokens held out of the training data for evaluation (0: none).
    shuffle_batches: an iterable source is shuffled within buffers of this many batches.
  """

  batch_size: int = 4096
  total_tokens: int | None = None
  lr: float | None = None
  lr_schedule: str = "constant"
  lr_end_ratio: float = 0.0
  warmup_steps: int = 1000
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 6.25e-10
  aux_k: int | None = None
  auxk_coef: float = 1.0 / 32.0
  dead_tokens: int = 10_000_000
  l1_coefficient: float = 5.0
  l0_coefficient: float = 1e-3
  seed: int = 0
  max_nan_batches: int = 10
  geometric_median_iters: int = 50
  log_every: int = 100
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  eval_every: int = 1000
  eval_tokens: int = 0
  shuffle_batches: int = 8

  # Fields that do not change what is computed: a restart may change them freely.
  RESTART_SAFE: ClassVar[tuple[str, ...]] = (
      "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "max_nan_batches")

  def __post_init__(self):
    _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
           f"batch_size={self.batch_size!r} must be an int >= 1")
    _check(self.total_tokens is None or self.total_tokens >= 1,
           f"total_tokens={self.total_tokens!r} must be >= 1 or None")
    _check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
           f"lr={self.lr!r} must be > 0 or None")
    _check(self.lr_schedule in LR_SCHEDULES,
           f"lr_schedule={self.lr_schedule!r}; allowed: {list(LR_SCHEDULES)}")
    _check(0.0 <= self.lr_end_ratio <= 1.0, f"lr_end_ratio={self.lr_end_ratio} must be in [0, 1]")
    _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
    _check(0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1,
           f"adam_b1={self.adam_b1}, adam_b2={self.adam_b2} must be in [0, 1)")
    _check(self.adam_eps > 0, f"adam_eps={self.adam_eps} must be > 0")
    _check(self.aux_k is None or self.aux_k >= 0, f"aux_k={self.aux_k} must be >= 0 or None")
    _check(self.auxk_coef >= 0, f"auxk_coef={self.auxk_coef} must be >= 0")
    _check(self.dead_tokens >= 1, f"dead_tokens={self.dead_tokens} must be >= 1")
    _check(self.l1_coefficient >= 0, f"l1_coefficient={self.l1_coefficient} must be >= 0")
    _check(self.l0_coefficient >= 0, f"l0_coefficient={self.l0_coefficient} must be >= 0")
    _check(self.max_nan_batches >= 0, f"max_nan_batches={self.max_nan_batches} must be >= 0")
    _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
    _check(self.checkpoint_every >= 1, f"checkpoint_every={self.checkpoint_every} must be >= 1")
    _check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
    _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
    _check(self.eval_tokens >= 0, f"eval_tokens={self.eval_tokens} must be >= 0")
    _check(self.shuffle_batches >= 1, f"shuffle_batches={self.shuffle_batches} must be >= 1")

  def learning_rate(self, d_sae: int) -> float:
    """The configured lr, or Gao et al.'s 2e-4 / sqrt(d_sae / 2**14)."""
    return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

  def resolved_aux_k(self, d_in: int, d_sae: int) -> int:
    """AuxK width: the configured value, or d_in // 2, never more than d_sae."""
    aux_k = d_in // 2 if self.aux_k is None else self.aux_k
    return min(aux_k, d_sae)


@dataclasses.dataclass(frozen=True)
class MeshConfig(_JsonMixin):
  """The device mesh: axes ("data", "model"); -1 means "all remaining devices".

  Attributes:
    data: devices along the token (batch) axis.
    model: devices along the latent axis (W_enc columns, W_dec rows).
  """

  AXES: ClassVar[tuple[str, str]] = ("data", "model")
  data: int = -1
  model: int = 1

  def __post_init__(self):
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
    path: the dataset name, a local file / glob, or the toy directory.
    name: the dataset configuration (e.g. a Wikipedia language/date), if any.
    split: the split to read.
    text_field: the column holding the text.
    meta_fields: columns carried per document (e.g. ``language``).
    ctx_len: tokens per sequence (the paper: the first 64 tokens of each article).
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

  def __post_init__(self):
    _check(self.source in DATA_SOURCES, f"data source={self.source!r}; allowed: {list(DATA_SOURCES)}")
    _check(self.mode in DATA_MODES, f"data mode={self.mode!r}; allowed: {list(DATA_MODES)}")
    _check(self.ctx_len >= 2, f"ctx_len={self.ctx_len} must be >= 2")
    _check(self.min_tokens >= 1, f"min_tokens={self.min_tokens} must be >= 1")
    _check(self.max_docs is None or self.max_docs >= 1, f"max_docs={self.max_docs} must be >= 1")
    _check(self.batch_size >= 1, f"data batch_size={self.batch_size} must be >= 1")
    _check(self.buffer_batches >= 1, f"buffer_batches={self.buffer_batches} must be >= 1")
    object.__setattr__(self, "meta_fields", tuple(self.meta_fields))


MISSING_REVISION = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TraceConfig(_JsonMixin):
  """The whole study: SAEs for every checkpoint x hook, evaluated and stored.

  Attributes:
    model: a local directory (one subdirectory per revision, as the toy world writes) or a hub
      repo id.
    revisions: checkpoint labels to trace; empty: every revision subdirectory found locally.
    hooks: activation sites (e.g. ``resid_post.11``, the paper's layer 12).
    sae: the SAE; ``d_in`` is taken from the model and ``d_sae`` = ``expansion`` * d_in when
      ``expansion`` > 0.
    expansion: latents per model dimension (0: keep ``sae.d_sae``).
    train: SAE training; data: text -> tokens.
    dtype: model compute dtype.
    eval_batches: forward batches for the spliced LM-loss evaluation.
    exports: file formats written next to each SAE (``sae_lens``, ``sparsify``, ``llm_jp_sae``).
    toy: train the toy world's model into ``model`` first if it is not there yet.
    toy_size: ``default`` (<= 5 min on 2 cores) or ``tiny`` (seconds).
    missing_revision: ``stop`` or ``skip`` when a revision cannot be found.
    activations: ``stream`` (extract while training) or ``cache`` (extract every hook into
      ``<workdir>/activations/<checkpoint>/<hook>/`` first, each host its own batches, then
      train from the cache: the same SAEs on any number of hosts, and the cache is reused).
    cache_dtype: ``float32`` or ``bfloat16`` rows in the cache.
    seed_baseline, baseline_seeds: at these revisions (labels, or ``final``) also train
      ``baseline_seeds`` SAEs that differ only in their init seed, into
      ``<checkpoint>/<hook>@seed<n>/``: how much two runs on the same activations share sets
      the scale for overlap across checkpoints.
    warm_start: initialise each checkpoint's SAE from the previous checkpoint's (same hook),
      as SAE-Track does; off by default (the paper trains each from scratch). Decoder matching
      across checkpoints is meaningful with it.
    analyze: run ``sj.analysis.analyze`` on the workdir when the trace is done.
    analysis_eval_tokens: evaluation-set size of that analysis.
    lexicon: TSV lexicon for granularity labels (empty: the toy world's own, if any).
  """

  model: str = ""
  revisions: tuple[str, ...] = ()
  hooks: tuple[str, ...] = ("resid_post.1",)
  sae: SAEConfig = dataclasses.field(default_factory=SAEConfig)
  expansion: int = 8
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  dtype: str = "float32"
  eval_batches: int = 4
  exports: tuple[str, ...] = ("sae_lens",)
  toy: bool = False
  toy_size: str = "default"
  missing_revision: str = "stop"
  activations: str = "stream"
  cache_dtype: str = "float32"
  warm_start: bool = False
  seed_baseline: tuple[str, ...] = ()
  baseline_seeds: int = 1
  analyze: bool = True
  analysis_eval_tokens: int = 20_000
  lexicon: str = ""

  def __post_init__(self):
    _check(bool(self.model), "trace model is empty; set a model directory or hub id")
    _check(self.activations in ("stream", "cache"), f"activations={self.activations!r}; "
           "allowed: 'stream', 'cache'")
    _check(self.cache_dtype in ("float32", "bfloat16"), f"cache_dtype={self.cache_dtype!r}; "
           "allowed: 'float32', 'bfloat16'")
    _check(len(self.hooks) >= 1, "trace hooks is empty; name at least one hook")
    _check(self.baseline_seeds >= 0, f"baseline_seeds={self.baseline_seeds} must be >= 0")
    _check(self.analysis_eval_tokens >= 1,
           f"analysis_eval_tokens={self.analysis_eval_tokens} must be >= 1")
    _check(self.expansion >= 0, f"expansion={self.expansion} must be >= 0")
    _check(self.dtype in DTYPES, f"dtype={self.dtype!r}; allowed: {list(DTYPES)}")
    _check(self.toy_size in ("default", "tiny"), f"toy_size={self.toy_size!r}; allowed: "
           "'default', 'tiny'")
    _check(self.missing_revision in MISSING_REVISION,
           f"missing_revision={self.missing_revision!r}; allowed: {list(MISSING_REVISION)}")
    from sae_jax.formats import FORMATS
    bad = [f for f in self.exports if f not in FORMATS]
    _check(not bad, f"unknown export format(s) {bad}; allowed: {list(FORMATS)}")
    for name in ("revisions", "hooks", "exports", "seed_baseline"):
      value = getattr(self, name)  # a lone string (--config.hooks=resid_post.3) is one item
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    d = dict(d)
    for key, sub in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig)):
      if isinstance(d.get(key), dict):
        d[key] = sub.from_dict(d[key])
    return super().from_dict(d)
