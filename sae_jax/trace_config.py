"""The trace's configuration: what is traced (the study), how activations are extracted, what is
written. Leaf data like ``config.py``: it imports nothing of the package but the configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from sae_jax.config import (DTYPES, DataConfig, MeshConfig, SAEConfig, TrainConfig, _as_tuple,
                            _check, _JsonMixin, _nest, _split_legacy_options)

MISSING_REVISION = ("stop", "skip")
SEED_BASELINE_WORDS = ("every", "final", "none")  # besides revision labels
ACTIVATION_MODES = ("stream", "cache")
CACHE_DTYPES = ("float32", "bfloat16")
TOY_SIZES = ("default", "tiny")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(_JsonMixin):
  """How the target model's activations are produced.

  Attributes:
    dtype: the model's compute dtype.
    activations: ``stream`` (extract while training) or ``cache`` (extract every hook into
      ``<workdir>/activations/<checkpoint>/<hook>/`` first, each host its own batches, then
      train from the cache: the same SAEs on any number of hosts, and the cache is reused).
    cache_dtype: ``float32`` or ``bfloat16`` rows in the cache.
  """

  dtype: str = "float32"
  activations: str = "stream"
  cache_dtype: str = "float32"

  def __post_init__(self):
    _check(self.dtype in DTYPES, f"dtype={self.dtype!r}; allowed: {list(DTYPES)}")
    _check(self.activations in ACTIVATION_MODES,
           f"activations={self.activations!r}; allowed: {list(ACTIVATION_MODES)}")
    _check(self.cache_dtype in CACHE_DTYPES,
           f"cache_dtype={self.cache_dtype!r}; allowed: {list(CACHE_DTYPES)}")


@dataclasses.dataclass(frozen=True)
class OutputConfig(_JsonMixin):
  """What a trace writes beside each SAE, and the analysis at its end.

  Attributes:
    exports: file formats written next to each SAE (``sae_lens``, ``sparsify``, ``llm_jp_sae``;
      checked against ``sj.formats.FORMATS`` when the trace starts).
    match_threshold: activation correlation at which two features are the same one; 0: the
      threshold calibrated on the seed baselines (``false_match_rate`` against shuffled
      pairings; 0.5 where there is no seed baseline).
    false_match_rate: the calibration's false-match rate.
    min_firings: a feature firing on fewer evaluation tokens is not matched at all.
    lineage_gap: weak links a lineage may bridge (each skips one checkpoint; flagged).
    eval_batches: forward batches for the spliced LM-loss evaluation.
    analyze: run ``sj.analysis.analyze`` on the workdir when the trace is done.
    analysis_eval_tokens: evaluation-set size of that analysis.
    lexicon: TSV lexicon for granularity labels (empty: the toy world's own, if any).
  """

  exports: tuple[str, ...] = ("sae_lens",)
  eval_batches: int = 4
  analyze: bool = True
  analysis_eval_tokens: int = 20_000
  lexicon: str = ""
  match_threshold: float = 0.0
  false_match_rate: float = 0.05
  min_firings: int = 5
  lineage_gap: int = 1

  def __post_init__(self):
    object.__setattr__(self, "exports", _as_tuple(self.exports))
    _check(0 <= self.match_threshold <= 1,
           f"match_threshold={self.match_threshold} must be in [0, 1] (0: calibrated)")
    _check(0 < self.false_match_rate < 1,
           f"false_match_rate={self.false_match_rate} must be in (0, 1)")
    _check(self.min_firings >= 1 and self.lineage_gap >= 0,
           f"min_firings={self.min_firings} must be >= 1, lineage_gap={self.lineage_gap} >= 0")
    _check(all(isinstance(f, str) and f for f in self.exports),
           f"exports={self.exports!r} must be format names")
    _check(self.eval_batches >= 0, f"eval_batches={self.eval_batches} must be >= 0")
    _check(self.analysis_eval_tokens >= 1,
           f"analysis_eval_tokens={self.analysis_eval_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TraceConfig(_JsonMixin):
  """The whole study: SAEs for every checkpoint x hook, evaluated and stored.

  Attributes:
    model: a local directory (one subdirectory per revision, as the toy world writes) or a hub
      repo id.
    revisions: checkpoint labels to trace; empty: every revision subdirectory found locally.
    hooks: activation sites (e.g. ``resid_post.11``, the paper's layer 12).
    missing_revision: ``stop`` or ``skip`` when a revision cannot be found.
    toy: train the toy world's model into ``model`` first if it is not there yet.
    toy_size: ``default`` (about 390 CPU-seconds in all, the SAEs and analysis included) or
      ``tiny`` (seconds).
    expansion: latents per model dimension: ``d_sae`` = ``expansion`` * d_in (0: keep
      ``sae.d_sae``); ``sae.d_in`` is always taken from the model.
    seed_baseline, baseline_seeds: at these revisions also train ``baseline_seeds`` SAEs that
      differ only in their init seed, into ``<checkpoint>/<hook>@seed<n>/``: how much two runs
      on the same activations share sets the scale for overlap across checkpoints (and
      calibrates the match threshold). ``seed_baseline`` is ``every`` (every revision),
      ``final`` (the last one), ``none``, or revision labels (``final`` may be among them).
    warm_start: initialise each checkpoint's SAE from the previous checkpoint's (same hook),
      as SAE-Track does; off by default (the paper trains each from scratch). Decoder matching
      across checkpoints is meaningful with it.
    sae, train, data: the SAE, its training, text -> tokens.
    extract: how activations are produced (:class:`ExtractConfig`).
    outputs: exports, spliced evaluation and analysis (:class:`OutputConfig`).
    mesh: the device mesh of the model's forward and the SAEs (:class:`MeshConfig`; default:
      every device on "data"; with ``model`` > 1 the SAEs' latents and the model's heads/MLP
      are split over it). Rerun-safe: it changes where the work runs, not what it computes
      (beyond float rounding).
  """

  model: str = ""
  revisions: tuple[str, ...] = ()
  hooks: tuple[str, ...] = ("resid_post.1",)
  missing_revision: str = "stop"
  toy: bool = False
  toy_size: str = "default"
  expansion: int = 8
  seed_baseline: tuple[str, ...] = ()
  baseline_seeds: int = 1
  warm_start: bool = False
  sae: SAEConfig = dataclasses.field(default_factory=SAEConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
  outputs: OutputConfig = dataclasses.field(default_factory=OutputConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  # Fields a rerun may change: they change what is added or analysed, not what exists.
  RERUN_SAFE: ClassVar[tuple[str, ...]] = (
      "missing_revision", "seed_baseline", "baseline_seeds", "outputs.analyze",
      "outputs.analysis_eval_tokens", "outputs.lexicon", "outputs.match_threshold",
      "outputs.false_match_rate", "outputs.min_firings", "outputs.lineage_gap", "mesh")

  def __post_init__(self):
    for name in ("revisions", "hooks", "seed_baseline"):
      object.__setattr__(self, name, _as_tuple(getattr(self, name)))
    _check(bool(self.model), "trace model is empty; set a model directory or hub id")
    _check(len(self.hooks) >= 1, "trace hooks is empty; name at least one hook")
    _check(self.baseline_seeds >= 0, f"baseline_seeds={self.baseline_seeds} must be >= 0")
    _check(not ({"every", "none"} & set(self.seed_baseline)) or len(self.seed_baseline) == 1,
           f"seed_baseline={self.seed_baseline!r}: 'every' and 'none' stand alone")
    _check(self.expansion >= 0, f"expansion={self.expansion} must be >= 0")
    _check(self.toy_size in TOY_SIZES, f"toy_size={self.toy_size!r}; allowed: {list(TOY_SIZES)}")
    _check(self.missing_revision in MISSING_REVISION,
           f"missing_revision={self.missing_revision!r}; allowed: {list(MISSING_REVISION)}")
    for name, sub in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig),
                      ("extract", ExtractConfig), ("outputs", OutputConfig),
                      ("mesh", MeshConfig)):
      _check(isinstance(getattr(self, name), sub),
             f"trace {name}={getattr(self, name)!r} must be a {sub.__name__}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    """From JSON; a trace.json written before the split (every field at the top) still loads."""
    d = dict(d)
    if isinstance(d.get("train"), dict) and isinstance(d.get("sae"), dict):
      # The architecture penalties were train fields: they are the SAE's options now.
      arch = d["sae"].get("architecture", "topk")
      _, moved = _split_legacy_options(d["train"])
      if moved.get(arch):
        d["sae"] = {**d["sae"], "options": {**moved[arch], **dict(d["sae"].get("options", {}))}}
    for key, sub in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig)):
      if isinstance(d.get(key), dict):
        d[key] = sub.from_dict(d[key])
    d = _nest(d, "extract", ExtractConfig)
    d = _nest(d, "outputs", OutputConfig)
    if isinstance(d.get("mesh"), dict):  # not _nest: "data" and "model" are trace fields too
      d["mesh"] = MeshConfig.from_dict(d["mesh"])
    return super().from_dict(d)
