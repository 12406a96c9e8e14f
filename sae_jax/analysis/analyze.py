"""``sj.analysis.analyze(workdir)``: every complete SAE of a trace -> statistics, labels, report.

Reads only the run store (``trace.json``, the complete SAEs ``Store.saes()`` lists) and the
model checkpoints it names; writes ``<workdir>/analysis/`` (layout: outputs.py):

    features.parquet / features.csv   one row per (checkpoint, hook, seed, live feature)
    summary.parquet / summary.csv     one row per SAE: label counts and shares, and the
                                      agreement of the paper's labels with the ground truth
    eval.parquet / eval.csv           one row per SAE: its training-time evaluation
    codes/<checkpoint>/<hook>.npz     top-k codes over the evaluation set (overlap analysis)
    overlap.*, lineage.*              feature matching over training (lineage.py)
    merges.*, nulls.*                 merges and splits; the random-model and token nulls
    thresholds.*, calibration.*       the threshold sweep; the seed pairs' calibration
    plots/*.png, report.html          figures and the offline feature browser
    findings.json                     the study's answer per checkpoint and its verdicts
                                      (findings.py), shown first in the report; with the
                                      model-level ground truth of a toy model (alignment.py)

The steps: statistics per checkpoint (codes.py, one model forward per batch for all its SAEs),
what each SAE's features are (describe.py), overlap and lineage (lineage.py), then the
presentation of those results (tables.py, plots.py, report.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable

from absl import logging

from sae_jax import console, paths, store
from sae_jax.analysis import findings, outputs, plots, report, tables
from sae_jax.analysis.alignment import model_alignment, word_vectors
from sae_jax.analysis.codes import feature_stats_many
from sae_jax.analysis.config import AnalysisConfig
from sae_jax.analysis.describe import SAEFeatures, describe_sae
from sae_jax.analysis.evalset import EvalSet, build_eval_set
from sae_jax.analysis.examples import read_examples
from sae_jax.analysis.granularity import GranularityConfig
from sae_jax.analysis.labels import label_examples
from sae_jax.analysis.lexicon import Lexicon, load_lexicon, toy_lexicon, toy_world
from sae_jax.analysis.lineage import THRESHOLD, OverlapResult, analyze_overlap
from sae_jax.analysis.stats import FeatureStats
from sae_jax.trace_config import TraceConfig
from sae_jax.data.cache import tokenizer_fingerprint
from sae_jax.errors import ConfigError, DataError
from sae_jax.formats import load_sae
from sae_jax.models import load_model
from sae_jax.store import SAERecord


def analyze(workdir: str | Path, cfg: AnalysisConfig = AnalysisConfig(),
            log_fn: Callable[[str], None] = logging.info, if_changed: bool = False) -> dict:
  """Analyse every complete SAE under ``workdir``; returns {name: path} of what was written.

  ``if_changed``: do nothing when ``analysis/DONE.json`` records the same SAEs and settings
  (a rerun of a finished trace does no work); the report is then returned as it is.
  """
  paths.check_location(workdir)
  run_store = store.Store(workdir)
  if not run_store.trace_config.exists():
    raise ConfigError(f"{workdir} holds no trace (trace.json missing); run the trace first")
  trace_cfg = TraceConfig.from_dict(store.read_json(run_store.trace_config))
  # The model directory (when local) holds each checkpoint's training step.
  run_store = store.Store(workdir, trace_cfg.model)
  records = run_store.saes()
  if not records:
    raise DataError(f"{workdir} has no complete SAEs (no <checkpoint>/<hook>/COMPLETE); finish "
                    "the trace first")
  out = run_store.analysis
  done = out / outputs.DONE
  fingerprint = _fingerprint(records, cfg)
  if if_changed and done.exists() and store.read_json(done).get("fingerprint") == fingerprint:
    log_fn(f"analysis of {len(records)} SAE(s) is up to date: {out / outputs.REPORT}")
    return {k: out / k for k in store.read_json(done)["written"]}
  done.unlink(missing_ok=True)  # until the new analysis is whole
  saes = {r.key: load_sae(r.path / "sae") for r in records}
  _check_d_in(saes, records)
  lexicon = _lexicon(cfg, trace_cfg)  # before the long part: a bad lexicon fails fast
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  evalset, stats, alignment = _all_stats(trace_cfg, records, saes, cfg, out, log_fn)
  described = [describe_sae(r, stats[r.key], evalset, lexicon, cfg) for r in records]
  overlap = None
  if cfg.overlap:
    overlap = analyze_overlap(records, saes, functools.partial(outputs.load_codes, out),
                              {d.record.key: d.labels for d in described}, log_fn=log_fn,
                              cfg=cfg.matching, tokens=evalset.ids[evalset.mask])
  written = _present(out, paths.as_path(workdir).name, described, overlap, evalset, cfg,
                     lexicon is not None and lexicon.ground_truth, alignment)
  store.atomic_write_json(done, {"fingerprint": fingerprint,
                                 "written": sorted(str(p.relative_to(out))
                                                   for p in written.values())})
  log_fn(f"analysis written to {out} ({time.perf_counter() - t0:.0f}s); open "
         f"{out / outputs.REPORT}")
  return written


def label_examples_file(input_path: str | Path, output_path: str | Path, lexicon: str = "",
                        cfg: GranularityConfig = GranularityConfig()) -> Path:
  """Label the features of a file of examples (the authors' demo format, see examples.py):
  a CSV of ``feature, n_en, n_ja, language, granularity`` and finer columns."""
  output_path = paths.as_path(output_path)
  if output_path.suffix != ".csv":
    raise ConfigError(f"output {output_path} must be a .csv file")
  features = read_examples(input_path)
  if not features:
    raise DataError(f"{input_path} holds no features")
  labels = label_examples(features, load_lexicon(lexicon) if lexicon else None, cfg)
  df = tables.example_labels_table(labels)
  store.atomic_write_bytes(output_path, lambda tmp: df.to_csv(tmp, index=False), suffix=".csv")
  return output_path


def _lexicon(cfg: AnalysisConfig, trace_cfg: TraceConfig) -> Lexicon | None:
  if cfg.lexicon:
    return load_lexicon(cfg.lexicon)
  return toy_lexicon(trace_cfg.model) if paths.as_path(trace_cfg.model).is_dir() else None


def _check_d_in(saes: dict[str, object], records: list[SAERecord]) -> None:
  by_hook: dict[str, tuple[int, str]] = {}
  for r in records:
    d = saes[r.key].cfg.d_in
    if r.hook in by_hook and by_hook[r.hook][0] != d:
      raise DataError(f"SAEs of hook {r.hook} differ in d_in: {by_hook[r.hook][1]} has "
                      f"{by_hook[r.hook][0]}, {r.key} has {d}; analyse them separately")
    by_hook.setdefault(r.hook, (d, r.key))


def _fingerprint(records: list[SAERecord], cfg: AnalysisConfig) -> dict:
  """What an analysis was made of: the SAEs (their COMPLETE stamps) and the settings."""
  # "pairs": the key DONE.json has always had, so finished analyses stay up to date.
  return {"pairs": {r.key: paths.mtime_ns(r.run.complete_marker) for r in records},
          "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def _all_stats(trace_cfg: TraceConfig, records: list[SAERecord], saes: dict,
               cfg: AnalysisConfig, out: Path, log_fn
               ) -> tuple[EvalSet, dict[str, FeatureStats], dict[tuple[str, str], dict]]:
  """The evaluation set (drawn with the first checkpoint's tokenizer), every SAE's statistics
  and, for a toy model, the model-level ground truth per (checkpoint, hook); one checkpoint's
  model at a time."""
  t0 = time.perf_counter()
  checkpoints = list(dict.fromkeys(r.checkpoint for r in records))
  evalset = None
  stats: dict[str, FeatureStats] = {}
  alignment: dict[tuple[str, str], dict] = {}
  world = toy_world(trace_cfg.model) if paths.as_path(trace_cfg.model).is_dir() else None
  for n, rev in enumerate(checkpoints):
    these = [r for r in records if r.checkpoint == rev]
    model = load_model(trace_cfg.model, revision=rev, dtype=trace_cfg.extract.dtype)
    if evalset is None:
      evalset = build_eval_set(model, trace_cfg.data, cfg.eval_tokens)
      log_fn(f"evaluation set: {evalset.ids.shape[0]} sequences, {evalset.n_tokens:,} tokens")
    if tokenizer_fingerprint(model.tokenizer) != evalset.tokenizer_fingerprint:
      raise DataError(f"checkpoint {rev} has another tokenizer than {checkpoints[0]}; the "
                      "evaluation set must be the same tokens for every checkpoint")
    stats.update(_checkpoint_stats(model, these, saes, evalset, cfg, out, log_fn))
    if world is not None:  # the model's own truth, independent of its SAEs
      for hook in dict.fromkeys(r.hook for r in these):
        alignment[(rev, hook)] = model_alignment(word_vectors(model, world, hook))
    console.live(log_fn)(f"[{n + 1}/{len(checkpoints)}] analysed {rev} ({len(these)} SAE(s), "
                         f"{time.perf_counter() - t0:.0f}s)")
  return evalset, stats, alignment


def _checkpoint_stats(model, records: list[SAERecord], saes: dict, evalset: EvalSet,
                      cfg: AnalysisConfig, out: Path, log_fn) -> dict[str, FeatureStats]:
  """Statistics of every SAE of one checkpoint from one forward per batch (all their hooks);
  each SAE's codes over the evaluation set go to ``analysis/codes/``."""
  hooks = list(dict.fromkeys(r.hook for r in records))
  found = feature_stats_many({r.key: (saes[r.key], r.hook) for r in records}, evalset,
                             lambda ids: model.activations(ids, hooks), cfg, log_fn)
  for r in records:
    _, values, indices = found[r.key]
    outputs.save_codes(out, r, values, indices)
  return {key: st for key, (st, _, _) in found.items()}


def _present(out: Path, title: str, described: list[SAEFeatures], overlap: OverlapResult | None,
             evalset: EvalSet, cfg: AnalysisConfig, ground_truth: bool,
             alignment: dict[tuple[str, str], dict]) -> dict[str, Path]:
  """Tables, figures, findings.json and the report of the results; {name: path} of the files
  written."""
  records = [d.record for d in described]
  evals = {r.key: store.read_json(r.run.eval) for r in records if r.run.eval.exists()}
  frames = {"features": tables.features_table(described, cfg, ground_truth),
            "summary": tables.summary_table(described, cfg, ground_truth),
            "eval": tables.eval_table(records, evals),
            "curves": tables.curves_table(records),
            "paper": tables.paper_labels_table(described)}
  threshold = overlap.threshold if overlap is not None else THRESHOLD
  if overlap is not None:
    frames["overlap"] = tables.overlap_table(overlap)
    frames["lineage"] = tables.lineage_table(overlap)
    frames["merges"] = tables.merges_table(overlap)
    frames["nulls"] = tables.nulls_table(overlap)
    frames["thresholds"] = tables.thresholds_table(overlap)
    frames["calibration"] = tables.calibration_table(overlap)
  found = findings.build_findings(described, evals, alignment, frames["curves"])
  store.atomic_write_json(out / outputs.FINDINGS, found)
  written = outputs.write_tables(out, frames)
  written[outputs.FINDINGS] = out / outputs.FINDINGS
  figures = plots.write_plots(frames, out / outputs.PLOTS, threshold,
                              overlap.checkpoints if overlap is not None else None)
  written.update({f"{outputs.PLOTS}/{name}.png": path for name, path in figures.items()})
  written[outputs.REPORT] = report.write_report(
      out / outputs.REPORT, title, frames, list(figures), described, evalset, cfg,
      functools.partial(outputs.load_codes, out),
      overlap.links if overlap is not None else {}, threshold, overlap, found)
  return written
