"""``sj.analysis.analyze(workdir)``: every complete SAE of a trace -> statistics, labels, report.

Reads only the run store (``trace.json``, ``<checkpoint>/<hook>/sae`` + ``COMPLETE``) and the
model checkpoints it names; writes ``<workdir>/analysis/``:

    features.parquet / features.csv   one row per (checkpoint, hook, feature)
    summary.parquet / summary.csv     one row per (checkpoint, hook): label counts and shares
    agreement.csv                     paper-rule vs ground-truth label agreement per pair
    codes/<checkpoint>/<hook>.npz     top-k codes over the evaluation set (overlap analysis)
    overlap*.csv, lineage.csv         feature matching over training (see overlap.py)
    plots/*.png, report.html          figures and the offline feature browser
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from sae_jax import store
from sae_jax.analysis.evalset import EvalSet, build_eval_set
from sae_jax.analysis.labels import LabelConfig
from sae_jax.analysis.lexicon import Lexicon, load_lexicon, toy_lexicon
from sae_jax.analysis.stats import FeatureStats, add_strong_firings, collect_stats_many
from sae_jax.trace_config import TraceConfig
from sae_jax.errors import ConfigError, DataError

SEED_SUFFIX = re.compile(r"^(?P<hook>.+)@seed(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """What the analysis computes.

  Attributes:
    eval_tokens: counted tokens in the evaluation set (the same for every checkpoint).
    seqs_per_batch: evaluation sequences per model forward.
    n_examples: strongest sequences kept per feature (the paper's example set: up to 50).
    sample_size, sample_seed: the random sample of live features summarised beside all of them
      (the paper labelled 100 per checkpoint by hand).
    lexicon: a TSV lexicon file (form, concept, category[, language]); empty: the toy world's
      own lexicon when the model is a toy model, else none (granularity: token vs multi_token).
    labels: thresholds of the label rules.
    browser_features: feature cards per (checkpoint, hook) in the HTML report (the sample and
      the most frequent features).
    contexts_per_feature, context_window: top contexts shown per card, tokens either side.
    overlap: run the overlap / lineage analysis too.
  """

  eval_tokens: int = 20_000
  seqs_per_batch: int = 64
  n_examples: int = 50
  sample_size: int = 100
  sample_seed: int = 0
  lexicon: str = ""
  labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
  browser_features: int = 300
  contexts_per_feature: int = 5
  context_window: int = 10
  overlap: bool = True

  def __post_init__(self):
    if self.eval_tokens < 1 or self.seqs_per_batch < 1 or self.n_examples < 1:
      raise ConfigError("eval_tokens, seqs_per_batch and n_examples must be >= 1 (got "
                        f"{self.eval_tokens}, {self.seqs_per_batch}, {self.n_examples})")


@dataclasses.dataclass
class Pair:
  """One complete SAE of the store: checkpoint label, hook, seed variant, directory."""

  checkpoint: str
  step: int | None
  hook: str
  seed: int  # 0: the trace's SAE; n: the seed-baseline SAE trained with init seed + n
  path: Path

  @property
  def key(self) -> str:
    return f"{self.checkpoint}/{self.hook}" + (f"@seed{self.seed}" if self.seed else "")


def find_pairs(workdir: Path, cfg: TraceConfig) -> list[Pair]:
  """Complete SAEs of the trace in ``workdir``, in training order."""
  from sae_jax.store import checkpoint_step
  pairs = []
  for rev_dir in sorted(p for p in workdir.iterdir() if p.is_dir()):
    if rev_dir.name in ("analysis", "activations"):
      continue
    for hook_dir in sorted(p for p in rev_dir.iterdir() if p.is_dir()):
      if not (hook_dir / "COMPLETE").exists():
        continue
      m = SEED_SUFFIX.match(hook_dir.name)
      hook, seed = (m["hook"], int(m["seed"])) if m else (hook_dir.name, 0)
      model_dir = cfg.model if Path(cfg.model).is_dir() else None
      pairs.append(Pair(rev_dir.name, checkpoint_step(rev_dir.name, model_dir), hook, seed,
                        hook_dir))
  pairs.sort(key=lambda p: (p.step is None, p.step or 0, p.checkpoint, p.hook, p.seed))
  return pairs


def _lexicon(cfg: AnalysisConfig, trace_cfg: TraceConfig) -> Lexicon | None:
  if cfg.lexicon:
    return load_lexicon(cfg.lexicon)
  return toy_lexicon(trace_cfg.model) if Path(trace_cfg.model).is_dir() else None


def _check_d_in(saes: dict[str, object], pairs: list[Pair]) -> None:
  by_hook: dict[str, tuple[int, str]] = {}
  for p in pairs:
    d = saes[p.key].cfg.d_in
    if p.hook in by_hook and by_hook[p.hook][0] != d:
      raise DataError(f"SAEs of hook {p.hook} differ in d_in: {by_hook[p.hook][1]} has "
                      f"{by_hook[p.hook][0]}, {p.key} has {d}; analyse them separately")
    by_hook.setdefault(p.hook, (d, p.key))


def _fingerprint(pairs: list[Pair], cfg: AnalysisConfig) -> dict:
  """What an analysis was made of: the SAEs (their COMPLETE stamps) and the settings."""
  return {"pairs": {p.key: (p.path / "COMPLETE").stat().st_mtime_ns for p in pairs},
          "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def analyze(workdir: str | Path, cfg: AnalysisConfig = AnalysisConfig(),
            log_fn: Callable[[str], None] = logging.info, if_changed: bool = False) -> dict:
  """Analyse every complete SAE under ``workdir``; returns {name: path} of what was written.

  ``if_changed``: do nothing when ``analysis/DONE.json`` records the same SAEs and settings
  (a rerun of a finished trace does no work); the report is then returned as it is.
  """
  from sae_jax.analysis import report
  from sae_jax.formats import load_sae
  workdir = Path(workdir)
  if not (workdir / "trace.json").exists():
    raise ConfigError(f"{workdir} holds no trace (trace.json missing); run the trace first")
  trace_cfg = TraceConfig.from_dict(store.read_json(workdir / "trace.json"))
  pairs = find_pairs(workdir, trace_cfg)
  if not pairs:
    raise DataError(f"{workdir} has no complete SAEs (no <checkpoint>/<hook>/COMPLETE); finish "
                    "the trace first")
  out = workdir / "analysis"
  done = out / "DONE.json"
  fingerprint = _fingerprint(pairs, cfg)
  if if_changed and done.exists() and store.read_json(done).get("fingerprint") == fingerprint:
    log_fn(f"analysis of {len(pairs)} SAE(s) is up to date: {out / 'report.html'}")
    return {k: out / k for k in store.read_json(done)["written"]}
  done.unlink(missing_ok=True)  # until the new analysis is whole
  saes = {p.key: load_sae(p.path / "sae") for p in pairs}
  _check_d_in(saes, pairs)
  lexicon = _lexicon(cfg, trace_cfg)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  checkpoints = list(dict.fromkeys(p.checkpoint for p in pairs))
  evalset = None
  stats: dict[str, FeatureStats] = {}
  for n, rev in enumerate(checkpoints):
    these = [p for p in pairs if p.checkpoint == rev]
    model = _load(trace_cfg, rev)
    if evalset is None:
      evalset = build_eval_set(model, trace_cfg.data, cfg.eval_tokens)
      log_fn(f"evaluation set: {evalset.ids.shape[0]} sequences, {evalset.n_tokens:,} tokens")
    from sae_jax.data.cache import tokenizer_fingerprint
    if tokenizer_fingerprint(model.tokenizer) != evalset.tokenizer_fingerprint:
      raise DataError(f"checkpoint {rev} has another tokenizer than {checkpoints[0]}; the "
                      "evaluation set must be the same tokens for every checkpoint")
    stats.update(_checkpoint_stats(model, these, saes, evalset, cfg, out, log_fn))
    log_fn(f"[{n + 1}/{len(checkpoints)}] analysed {rev} ({len(these)} SAE(s), "
           f"{time.perf_counter() - t0:.0f}s)")
  tables = report.build_tables(pairs, stats, evalset, lexicon, cfg)
  written = report.write_tables(tables, out)
  if cfg.overlap:
    from sae_jax.analysis import overlap
    written.update(overlap.analyze_overlap(pairs, saes, out, tables, log_fn=log_fn))
  written.update(report.write_report(tables, pairs, stats, evalset, cfg, out, workdir))
  store.atomic_write_json(done, {"fingerprint": fingerprint,
                                 "written": sorted(str(p.relative_to(out))
                                                   for p in written.values())})
  log_fn(f"analysis written to {out} ({time.perf_counter() - t0:.0f}s); open "
         f"{out / 'report.html'}")
  return written


def _load(trace_cfg: TraceConfig, rev: str):
  from sae_jax.models import load_model
  from sae_jax.models.hf import resolve
  model = load_model(resolve(trace_cfg.model, rev), dtype=trace_cfg.extract.dtype)
  model.revision = rev
  return model


def _checkpoint_stats(model, pairs: list[Pair], saes: dict, evalset: EvalSet,
                      cfg: AnalysisConfig, out: Path, log_fn) -> dict[str, FeatureStats]:
  """Statistics of every SAE of one checkpoint from one forward per batch (all their hooks);
  each SAE's codes over the evaluation set go to ``analysis/codes/``."""
  hooks = list(dict.fromkeys(p.hook for p in pairs))
  found = feature_stats_many({p.key: (saes[p.key], p.hook) for p in pairs}, evalset,
                             lambda ids: model.activations(ids, hooks), cfg, log_fn)
  for p in pairs:
    _, values, indices = found[p.key]
    path = out / "codes" / p.checkpoint / (p.path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, values=values, indices=indices)
    tmp.replace(path)
  return {key: st for key, (st, _, _) in found.items()}


def feature_stats(sae, evalset: EvalSet, acts_fn: Callable, cfg: AnalysisConfig = AnalysisConfig(),
                  log_fn: Callable[[str], None] | None = None
                  ) -> tuple[FeatureStats, np.ndarray, np.ndarray]:
  """Statistics of ``sae`` over ``evalset`` plus its codes (values, indices) [N, k].

  ``acts_fn(ids [b, T]) -> [b, T, d_in]`` gives the hook's activations (a model forward, or
  anything else in tests); rows are the evaluation set's counted tokens in order.
  """
  return feature_stats_many({"": (sae, "")}, evalset, lambda ids: {"": acts_fn(ids)}, cfg,
                            log_fn)[""]


def feature_stats_many(saes: dict, evalset: EvalSet, acts_fn: Callable,
                       cfg: AnalysisConfig = AnalysisConfig(),
                       log_fn: Callable[[str], None] | None = None) -> dict:
  """{name: (FeatureStats, values, indices)} of several SAEs ({name: (sae, hook)}) over one
  pass of ``evalset``; ``acts_fn(ids [b, T]) -> {hook: [b, T, d]}`` runs once per batch."""
  def batches():
    for s, ids, mask in evalset.batches(cfg.seqs_per_batch):
      acts = acts_fn(ids)
      rows, cols = np.nonzero(mask)
      yield ({h: np.asarray(a, np.float32)[rows, cols] for h, a in acts.items()},
             ids[rows, cols], rows + s, cols.astype(np.int32),
             evalset.language[s:s + len(ids)][rows, cols])

  codes = {name: ([], []) for name in saes}

  def keep(name, v, i):
    codes[name][0].append(v.astype(np.float32))
    codes[name][1].append(i.astype(np.int32))

  found = collect_stats_many(saes, batches(), len(evalset.token_text), cfg.n_examples,
                             log_fn=log_fn, total_tokens=evalset.n_tokens, on_codes=keep)
  seq, pos = np.nonzero(evalset.mask)  # the codes' rows, in order
  out = {}
  for name, st in found.items():
    values, indices = np.concatenate(codes[name][0]), np.concatenate(codes[name][1])
    add_strong_firings(st, values, indices, evalset.ids[evalset.mask],
                       evalset.language[evalset.mask], seq, pos.astype(np.int32),
                       cfg.labels.example_fraction, seed=cfg.sample_seed)
    out[name] = (st, values, indices)
  return out
