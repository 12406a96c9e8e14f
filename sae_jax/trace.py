"""The trace: for every checkpoint (in training order) and hook, train an SAE, evaluate it,
export it, mark it COMPLETE; skip what is done, resume what was cut off. The hooks of one
checkpoint share one model forward (their SAEs train side by side).

Where everything goes is the run store's business (:class:`sae_jax.store.Store`):
``trace.json``, ``<checkpoint>/<hook>[@seed<n>]/``, ``summary.csv`` (one row per SAE of the
trace: the table over checkpoints), ``activations/`` in cache mode.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sae_jax import data as sj_data

from sae_jax import console, distributed, evals, formats, paths, sharding, store
from sae_jax.analysis import AnalysisConfig, MatchConfig, analyze
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.trace_config import TraceConfig
from sae_jax.data.cache import CacheReader, MultiCacheReader, write_cache
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.models import load_model
from sae_jax.models.hf import read_config, resolve
from sae_jax.models.hooks import parse_hook
from sae_jax.saes import registry
from sae_jax.saes.sae import SAE
from sae_jax.toy.lm import TINY_LM, TINY_WORLD, LMConfig, train_toy_lm
from sae_jax.toy.world import WorldConfig
from sae_jax.train.jobs import SAEJob
from sae_jax.train.loop import train_saes

SUMMARY_FIELDS = ("checkpoint", "step", "hook", "fvu", "l0", "dead_fraction", "cosine",
                  "ce_clean", "ce_sae", "ce_loss_recovered", "delta_lm_loss", "kl_sae")


def validate(cfg: TraceConfig) -> None:
  """What can be checked before any model is loaded: the architecture (its name and options;
  k against d_sae once the model's width is known) and the export formats."""
  # The template's d_sae is a placeholder until the model's width is known: check the rest.
  registry.check(cfg.sae.replace(d_sae=max(cfg.sae.d_sae, cfg.sae.k or 1)))
  formats.check_formats(cfg.outputs.exports)
  # Every hook names a site; for a toy model not trained yet, one its depth will have (a bad
  # hook is said now, not after minutes of training the toy model).
  toy_layers = None
  if cfg.toy and not (paths.as_path(cfg.model) / "world.json").exists():
    toy_layers = (TINY_LM if cfg.toy_size == "tiny" else LMConfig()).n_layers
  for hook in cfg.hooks:
    parse_hook(hook, toy_layers)


def sae_config_for(cfg: TraceConfig, d_model: int) -> SAEConfig:
  """The trace's SAE for a model of width ``d_model``: d_in from the model, d_sae from the
  expansion (when set)."""
  return cfg.sae.replace(d_in=d_model,
                         d_sae=cfg.expansion * d_model if cfg.expansion else cfg.sae.d_sae)


def sae_metadata(cfg: TraceConfig, sae_cfg: SAEConfig, revision: str | None, hook: str,
                 seed: int = 0) -> dict:
  """Provenance stored with every SAE of a trace."""
  return {"model_name": str(cfg.model), "revision": revision, "hook_name": hook,
          "normalize": sae_cfg.normalize, "baseline_seed": seed}


def prepare_toy(cfg: TraceConfig, log_fn) -> None:
  """Train the toy world's model into ``cfg.model`` if it is not there yet (process 0)."""
  if not (paths.as_path(cfg.model) / "world.json").exists() and distributed.is_primary():
    log_fn(f"training the toy world's model into {cfg.model} (first use)")
    world, lm = (TINY_WORLD, TINY_LM) if cfg.toy_size == "tiny" else (WorldConfig(), LMConfig())
    train_toy_lm(cfg.model, world, lm, log_fn=log_fn)
  distributed.barrier("toy model ready")


def revisions_of(cfg: TraceConfig) -> list[str]:
  """The checkpoint labels to trace: the configured ones, or every local revision."""
  if cfg.revisions:
    return list(cfg.revisions)
  if not paths.as_path(cfg.model).is_dir():
    raise ConfigError(f"revisions is empty and {cfg.model!r} is not a local directory; list "
                      "the revisions to trace")
  return store.local_revisions(cfg.model)


def _comparable(config: dict) -> dict:
  """A trace config without the fields a rerun may change freely."""
  d = json.loads(json.dumps(config))  # a copy, with tuples as lists (as trace.json has them)
  for k in TrainConfig.RESTART_SAFE:
    d.get("train", {}).pop(k, None)
  for dotted in TraceConfig.RERUN_SAFE:
    *parents, leaf = dotted.split(".")
    holder = d
    for p in parents:
      holder = holder.get(p, {})
    holder.pop(leaf, None)
  return d


def _check_workdir(st: store.Store, cfg: TraceConfig, overwrite: bool) -> None:
  if not st.trace_config.exists():
    return
  old = store.read_json(st.trace_config)
  try:  # fields added since that trace was written compare at their defaults
    old = TraceConfig.from_dict(old).to_dict()
  except (ConfigError, TypeError, KeyError):
    pass  # an unreadable old config is compared as it is
  diffs = store.config_differences(_comparable(old), _comparable(cfg.to_dict()))
  if diffs and not overwrite:
    raise ConfigError(f"workdir {st.path} holds another trace (" + "; ".join(diffs[:5]) +
                      "); use another workdir or overwrite")


def _seed_revisions(cfg: TraceConfig, revisions: list[str]) -> set[str]:
  """The revisions that get seed-baseline SAEs ("final": the last one; "every": all)."""
  if not cfg.baseline_seeds or cfg.seed_baseline in ((), ("none",)):
    return set()
  if cfg.seed_baseline == ("every",):
    return set(revisions)
  chosen = {revisions[-1] if r == "final" else r for r in cfg.seed_baseline}
  unknown = chosen - set(revisions)
  if unknown:
    raise ConfigError(f"seed_baseline names {sorted(unknown)}, not among the traced revisions "
                      f"{revisions}; use revision labels or 'final'")
  return chosen


@dataclasses.dataclass(frozen=True)
class _Planned:
  """One SAE of a checkpoint: its hook, init-seed offset (0: the trace's SAE) and run dir."""

  hook: str
  seed: int
  run: store.RunDir


def trace_mesh(cfg: TraceConfig, devices=None) -> Mesh:
  """The trace's ("data", "model") mesh over ``devices`` (default: every device of every
  process), checked against the batch sizes and the process count before any model loads."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  data, procs = mesh.shape["data"], jax.process_count()
  sharding.check_divisible(cfg.train.batch_size, mesh, "data", "train batch_size")
  if (cfg.data.batch_size * procs) % data:
    raise ConfigError(f"data batch_size={cfg.data.batch_size} x {procs} process(es) is not "
                      f"divisible by the mesh 'data' axis size {data} (a forward batch is split "
                      "over it)")
  if data % procs or cfg.data.buffer_batches % procs:
    raise ConfigError(f"the mesh 'data' axis size {data} and buffer_batches="
                      f"{cfg.data.buffer_batches} must be multiples of the process count {procs} "
                      "(every process feeds its own rows to its own devices)")
  return mesh


def trace(cfg: TraceConfig, workdir: str | Path, overwrite: bool = False,
          log_fn: Callable[[str], None] = logging.info, devices=None) -> list[dict]:
  """Run (or finish) the trace into ``workdir``; returns the summary rows.

  ``devices``: what ``cfg.mesh`` spans (default: every device of every process).
  """
  paths.check_location(workdir)  # a bucket that cannot be used is said before any work
  paths.check_location(cfg.model, "model")
  validate(cfg)
  mesh = trace_mesh(cfg, devices)
  st = store.Store(workdir, cfg.model)
  _check_workdir(st, cfg, overwrite)
  st.path.mkdir(parents=True, exist_ok=True)
  if distributed.is_primary():
    log_fn = console.Tee(log_fn, st.log)  # the console's lines, progress too, in trace.log
  try:
    if cfg.toy:
      prepare_toy(cfg, log_fn)
      st = store.Store(workdir, cfg.model)  # the model directory exists now
    if distributed.is_primary():
      store.atomic_write_json(st.trace_config, cfg.to_dict())
    rows = _trace_revisions(cfg, st, overwrite, log_fn, mesh)
  finally:
    if isinstance(log_fn, console.Tee):
      log_fn.close()
  return rows


def _trace_revisions(cfg: TraceConfig, st: store.Store, overwrite: bool, log_fn, mesh: Mesh
                     ) -> list[dict]:
  """Every revision in training order: train what is unfinished, one line per SAE."""
  revisions = revisions_of(cfg)
  seeded = _seed_revisions(cfg, revisions)
  rows, t0 = [], time.perf_counter()
  done_revs: list[str] = []  # revisions traced so far (the warm start's source)
  for n, rev in enumerate(revisions):
    if not _available(cfg, rev, log_fn):
      continue
    planned = [_Planned(h, s, st.run(rev, h, s)) for s in range(cfg.baseline_seeds + 1)
               if s == 0 or rev in seeded for h in cfg.hooks]
    # With overwrite, finished runs go through train_saes, which keeps those whose config
    # still matches and retrains the others.
    todo = [p for p in planned if overwrite or not p.run.is_complete()]
    if todo:
      _trace_checkpoint(cfg, st, rev, todo, done_revs[-1] if done_revs else None, overwrite,
                        log_fn, mesh)
    done_revs.append(rev)
    for p in planned:
      row = _summary_row(st, rev, p)
      if not p.seed:
        rows.append(row)
      log_fn(f"[{n + 1}/{len(revisions)}] {rev} {p.run.path.name}: "
             + ("done already; " if p not in todo else "")
             + f"fvu {row['fvu']:.4f} dead {row['dead_fraction']:.3f} L0 {row['l0']:.1f} "
             f"CE recovered {row['ce_loss_recovered']:.4f} ({time.perf_counter() - t0:.0f}s)")
  _finish(cfg, st, rows, log_fn)
  return rows


def _available(cfg: TraceConfig, rev: str, log_fn) -> bool:
  """Whether revision ``rev`` of the model exists (missing: skip or stop, as configured)."""
  try:
    resolve(cfg.model, rev)
  except CheckpointError as e:
    if cfg.missing_revision == "skip":
      log_fn(f"skipping revision {rev!r}: {e}")
      return False
    raise CheckpointError(f"revision {rev!r} of {cfg.model!r} is missing ({e}); set "
                          "missing_revision='skip' to continue without it") from None
  return True


def _finish(cfg: TraceConfig, st: store.Store, rows: list[dict], log_fn) -> None:
  """summary.csv, the summary table, and the analysis (process 0)."""
  if distributed.is_primary():
    store.atomic_write_text(st.summary, _csv(rows))
  log_fn("\n" + _table(rows))
  if cfg.outputs.analyze and distributed.is_primary():
    analyze(st.path, analysis_config(cfg.outputs), log_fn=log_fn, if_changed=True)
  distributed.barrier("trace: analysed")


def analysis_config(outputs, **overrides) -> AnalysisConfig:
  """The analysis a trace's ``outputs`` ask for (``overrides``: AnalysisConfig fields)."""
  o = outputs
  return AnalysisConfig(**{
      "eval_tokens": o.analysis_eval_tokens, "lexicon": o.lexicon,
      "matching": MatchConfig(threshold=o.match_threshold, false_match_rate=o.false_match_rate,
                              min_firings=o.min_firings, lineage_gap=o.lineage_gap),
      **overrides})


def _trace_checkpoint(cfg: TraceConfig, st: store.Store, rev: str, todo: list[_Planned],
                      previous: str | None, overwrite: bool, log_fn, mesh: Mesh) -> None:
  """Train the unfinished SAEs of one checkpoint: every hook's SAE from one shared model
  forward on ``mesh``, its activations mixed on the devices (stream mode), or from the hooks'
  caches read side by side (cache mode)."""
  _, model_cfg = read_config(resolve(cfg.model, rev))  # the width, without the weights
  for hook in cfg.hooks:
    parse_hook(hook, model_cfg.n_layers)  # a hook the model lacks: one line, before work
  sae_cfg = sae_config_for(cfg, model_cfg.d_model)
  registry.check(sae_cfg)  # k against the real d_sae, before any extraction
  sharding.check_divisible(sae_cfg.d_sae, mesh, "model", "d_sae")
  # Cache mode on several hosts: each host writes its own batches with the model on its own
  # devices (sharded over its "model" axis; no collective across hosts while extracting).
  local = cfg.extract.activations == "cache" and sharding.spans_processes(mesh)
  model_mesh = sharding.local_mesh(mesh) if local else mesh
  if local:
    log_fn(f"{rev}: cache mode on {jax.process_count()} processes: each host extracts with the "
           f"model on its own {dict(model_mesh.shape)} devices")
  model = load_model(cfg.model, revision=rev, dtype=cfg.extract.dtype, mesh=model_mesh)
  hooks = list(dict.fromkeys(p.hook for p in todo))
  if cfg.extract.activations == "cache":
    caches = write_caches(cfg, model, rev, hooks, st, log_fn)
    rows = MultiCacheReader({h: CacheReader(p, seed=cfg.data.seed) for h, p in caches.items()})
  else:
    rows = sj_data.multi_hook_rows(model, cfg.data, hooks)
  warm = _warm_params(cfg, st, previous, hooks, log_fn)
  finish = EvaluateAndExport(cfg, model, rev, log_fn)
  jobs = [SAEJob(sae_cfg, cfg.train, p.run.path, hook=p.hook, name=p.run.path.name,
                 on_complete=finish, init_seed=cfg.train.seed + p.seed if p.seed else None,
                 init_params=warm.get(p.hook) if not p.seed else None,
                 metadata=sae_metadata(cfg, sae_cfg, rev, p.hook, p.seed))
          for p in todo]
  train_saes(rows, jobs, mesh, overwrite=overwrite, log_fn=log_fn)


class EvaluateAndExport:
  """The trace's completion hook: the spliced LM evaluation into ``eval.json``, then the
  exports, on the whole held-out stream (every process reads all of it), so eval.json does not
  depend on the number of hosts. A model on a mesh across several processes evaluates on that
  mesh with every process taking part (``collective``: the trainer calls the hook on every
  process); process 0 alone writes."""

  def __init__(self, cfg: TraceConfig, model, rev: str, log_fn):
    self.cfg, self.model, self.rev, self.log_fn = cfg, model, rev, log_fn
    self.collective = sharding.spans_processes(model.mesh)
    self.eval_batches = sj_data.token_batches(
        model, cfg.data.replace(seed=cfg.data.seed + 7919), 0, 1)
    self._said = False

  def __call__(self, sae: SAE, run: store.RunDir) -> None:
    if not (self.collective or distributed.is_primary()):
      return  # a model each host holds alone: process 0 evaluates and writes
    hook = sae.metadata["hook_name"]
    mesh = self.model.mesh if self.collective else None
    lm = evals.spliced_metrics(self.model, sae, hook, self.eval_batches,
                               self.cfg.outputs.eval_batches, mesh=mesh)
    if not distributed.is_primary():
      return
    if mesh is not None and not self._said:
      self._said = True
      self.log_fn(f"{self.rev}: spliced evaluation on the {dict(mesh.shape)} mesh across "
                  f"{jax.process_count()} processes")
    store.atomic_write_json(run.eval, {**sae.metadata.get("eval", {}), **lm})
    for fmt in self.cfg.outputs.exports:
      try:
        sae.export(run.path / "exports" / fmt, format=fmt)
      except ConfigError as e:  # e.g. sparsify cannot hold a unit-norm SAE: say so, go on
        self.log_fn(f"{self.rev} {hook}: not exported as {fmt}: {e}")


def _warm_params(cfg: TraceConfig, st: store.Store, previous: str | None, hooks, log_fn
                 ) -> dict:
  """hook -> the previous checkpoint's SAE parameters (warm start), where there is one."""
  if not cfg.warm_start or previous is None:
    return {}
  out = {}
  for hook in hooks:
    prev = st.run(previous, hook)
    if prev.is_complete():
      out[hook] = {k: np.asarray(v) for k, v in formats.load_sae(prev.sae).params.items()}
    else:
      log_fn(f"warm start: no complete SAE for {previous} {hook}; starting from scratch")
  return out


def write_caches(cfg: TraceConfig, model, rev: str, hooks, st: store.Store, log_fn=print
                 ) -> dict[str, Path]:
  """Extract every hook of one checkpoint into the store's activation caches.

  Each process writes its own batches (resumable); returns {hook: cache path} once every
  process is done.
  """
  batches = sj_data.token_batches(model, cfg.data)
  where = {h: st.cache(rev, h) for h in hooks}
  for hook, path in where.items():
    log_fn(f"{rev} {hook}: caching activations into {path}")
    write_cache(path, model, batches, hook, cfg.extract.cache_dtype, jax.process_index(),
                jax.process_count(), log_fn=log_fn)
  distributed.barrier(f"cache {rev} written")
  return where


def _summary_row(st: store.Store, rev: str, p: _Planned) -> dict:
  ev = store.read_json(p.run.eval) if p.run.eval.exists() else {}
  row = {"checkpoint": rev, "step": st.step(rev), "hook": p.hook}
  row.update({k: ev.get(k, float("nan")) for k in SUMMARY_FIELDS[3:]})
  return row


def _csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def _table(rows: list[dict]) -> str:
  """The summary table over checkpoints (what summary.csv holds, to read at a glance)."""
  cols = ("checkpoint", "hook", "fvu", "l0", "dead_fraction", "ce_loss_recovered",
          "delta_lm_loss")
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  cells = [list(cols)] + [[fmt(r[c]) for c in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
