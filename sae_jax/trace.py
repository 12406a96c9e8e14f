"""The trace: for every checkpoint (in training order) and hook, train an SAE, evaluate it,
export it, mark it COMPLETE; skip what is done, resume what was cut off. The hooks of one
checkpoint share one model forward (their SAEs train side by side).

Layout (see ``store.py``): ``<workdir>/trace.json``, ``<workdir>/<checkpoint>/<hook>/...`` and
``<workdir>/summary.csv`` (one row per pair: the table over checkpoints).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import logging

from sae_jax import data as sj_data
from sae_jax import distributed, evals, store
from sae_jax.config import TraceConfig, TrainConfig
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.models import load_model
from sae_jax.models.hf import resolve
from sae_jax.models.hooks import parse_hook
from sae_jax.train.loop import SAEJob, train_saes

SUMMARY_FIELDS = ("checkpoint", "step", "hook", "fvu", "l0", "dead_fraction", "cosine",
                  "ce_clean", "ce_sae", "ce_loss_recovered", "delta_lm_loss", "kl_sae")


def checkpoint_step(label: str, path: Path | None = None) -> int | None:
  """Training step of a checkpoint label ("step1000", "iter_0001000") or its config."""
  if path is not None and (path / "config.json").exists():
    info = store.read_json(path / "config.json").get("sae_jax_toy", {})
    if "step" in info:
      return int(info["step"])
  m = re.search(r"(\d+)$", label)
  return int(m.group(1)) if m else None


def discover_revisions(model_dir: Path) -> list[str]:
  """Revision subdirectories of a local model directory, in training order."""
  found = [p for p in model_dir.iterdir() if p.is_dir() and (p / "config.json").exists()]
  return [p.name for p in sorted(found, key=lambda p: (checkpoint_step(p.name, p) is None,
                                                       checkpoint_step(p.name, p) or 0, p.name))]


def _prepare_toy(cfg: TraceConfig, log_fn) -> None:
  from sae_jax.toy.lm import TINY_LM, TINY_WORLD, LMConfig, train_toy_lm
  from sae_jax.toy.world import WorldConfig
  if not (Path(cfg.model) / "world.json").exists() and distributed.is_primary():
    log_fn(f"training the toy world's model into {cfg.model} (first use)")
    world, lm = (TINY_WORLD, TINY_LM) if cfg.toy_size == "tiny" else (WorldConfig(), LMConfig())
    train_toy_lm(cfg.model, world, lm, log_fn=log_fn)
  distributed.barrier("toy model ready")


def _check_workdir(workdir: Path, cfg: TraceConfig, overwrite: bool) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"workdir {workdir} is a file; pass a directory")
  saved = workdir / "trace.json"
  if not saved.exists():
    return
  old = store.read_json(saved)
  try:  # fields added since that trace was written compare at their defaults
    old = TraceConfig.from_dict(old).to_dict()
  except Exception:  # noqa: BLE001 - an unreadable old config is compared as it is
    pass
  diffs = store.config_differences(_comparable(old), _comparable(cfg.to_dict()))
  if diffs and not overwrite:
    raise ConfigError(f"workdir {workdir} holds another trace (" + "; ".join(diffs[:5]) +
                      "); use another workdir or overwrite")


def _comparable(config: dict) -> dict:
  """A trace config without the fields a rerun may change freely."""
  d = json.loads(json.dumps(config))  # a copy, with tuples as lists (as trace.json has them)
  for k in TrainConfig.RESTART_SAFE:
    d.get("train", {}).pop(k, None)
  for k in ("missing_revision", "analyze", "analysis_eval_tokens", "lexicon", "seed_baseline",
            "baseline_seeds"):  # these change what is added or analysed, not what exists
    d.pop(k, None)
  return d


def trace(cfg: TraceConfig, workdir: str | Path, overwrite: bool = False,
          log_fn: Callable[[str], None] = logging.info) -> list[dict]:
  """Run (or finish) the trace into ``workdir``; returns the summary rows."""
  workdir = Path(workdir)
  _check_workdir(workdir, cfg, overwrite)
  if cfg.toy:
    _prepare_toy(cfg, log_fn)
  workdir.mkdir(parents=True, exist_ok=True)
  if distributed.is_primary():
    store.atomic_write_json(workdir / "trace.json", cfg.to_dict())
  revisions = list(cfg.revisions)
  local = Path(cfg.model).is_dir()
  if not revisions:
    if not local:
      raise ConfigError(f"revisions is empty and {cfg.model!r} is not a local directory; list "
                        "the revisions to trace")
    revisions = discover_revisions(Path(cfg.model))
  rows, t0 = [], time.perf_counter()
  seeded = _seed_revisions(cfg, revisions)
  done_revs: list[str] = []  # revisions traced so far (the warm start's source)
  for n, rev in enumerate(revisions):
    try:
      path = resolve(cfg.model, rev)
    except CheckpointError as e:
      if cfg.missing_revision == "skip":
        log_fn(f"skipping revision {rev!r}: {e}")
        continue
      raise CheckpointError(f"revision {rev!r} of {cfg.model!r} is missing ({e}); set "
                            "missing_revision='skip' to continue without it") from None
    pairs = [(h, store.RunDir.for_pair(workdir, rev, h)) for h in cfg.hooks]
    # The seed baseline: the same hook's SAE again with another init seed, same batches.
    seeds = [(h, store.RunDir.for_pair(workdir, rev, f"{h}@seed{s}"), s)
             for s in range(1, cfg.baseline_seeds + 1) if rev in seeded for h in cfg.hooks]
    runs = [(h, p, 0) for h, p in pairs] + seeds
    # With overwrite, finished pairs go through train_saes, which keeps those whose config
    # still matches and retrains the others.
    if not overwrite and all(p.is_complete() for _, p, _ in runs):
      rows += [_summary_row(rev, path, h, p) for h, p in pairs]
      log_fn(f"[{n + 1}/{len(revisions)}] {rev}: done already")
      done_revs.append(rev)
      continue
    model = load_model(path, dtype=cfg.dtype)
    model.revision = rev
    for hook, _ in pairs:
      parse_hook(hook, model.cfg.n_layers)  # a hook the model lacks: one line, before work
    todo = [(h, p, s) for h, p, s in runs if overwrite or not p.is_complete()]
    if todo:
      warm = _warm_params(cfg, workdir, done_revs[-1] if done_revs else None, todo, log_fn)
      _train_pairs(cfg, model, rev, todo, overwrite, log_fn, workdir, warm)
    done_revs.append(rev)
    for hook, pair in pairs:
      rows.append(_summary_row(rev, path, hook, pair))
      log_fn(f"[{n + 1}/{len(revisions)}] {rev} {hook}: fvu {rows[-1]['fvu']:.4f} "
             f"CE recovered {rows[-1]['ce_loss_recovered']:.4f} "
             f"({time.perf_counter() - t0:.0f}s)")
  if distributed.is_primary():
    store.atomic_write_text(workdir / "summary.csv", _csv(rows))
  log_fn("\n" + _table(rows))
  if cfg.analyze and distributed.is_primary():
    from sae_jax.analysis import AnalysisConfig, analyze
    analyze(workdir, AnalysisConfig(eval_tokens=cfg.analysis_eval_tokens, lexicon=cfg.lexicon),
            log_fn=log_fn, if_changed=True)
  distributed.barrier("trace: analysed")
  return rows


def _warm_params(cfg: TraceConfig, workdir: Path, previous: str | None, todo, log_fn) -> dict:
  """hook -> the previous checkpoint's SAE parameters (warm start), where there is one."""
  if not cfg.warm_start or previous is None:
    return {}
  from sae_jax.formats import load_sae
  out = {}
  for hook in dict.fromkeys(h for h, _, _ in todo):
    prev = store.RunDir.for_pair(workdir, previous, hook)
    if prev.is_complete():
      out[hook] = {k: np.asarray(v) for k, v in load_sae(prev.sae).params.items()}
    else:
      log_fn(f"warm start: no complete SAE for {previous} {hook}; starting from scratch")
  return out


def _seed_revisions(cfg: TraceConfig, revisions: list[str]) -> set[str]:
  """The revisions that get seed-baseline SAEs ("final": the last one)."""
  if not cfg.baseline_seeds:
    return set()
  chosen = {revisions[-1] if r == "final" else r for r in cfg.seed_baseline}
  unknown = chosen - set(revisions)
  if unknown:
    raise ConfigError(f"seed_baseline names {sorted(unknown)}, not among the traced revisions "
                      f"{revisions}; use revision labels or 'final'")
  return chosen


def write_caches(cfg: TraceConfig, model, rev: str, hooks, workdir: Path, log_fn=print
                 ) -> dict[str, Path]:
  """Extract every hook of one checkpoint into ``<workdir>/activations/<rev>/<hook>/``.

  Each process writes its own batches (resumable); returns {hook: cache path} once every
  process is done.
  """
  from sae_jax.data.cache import write_cache
  batches = sj_data.token_batches(model, cfg.data)
  paths = {h: Path(workdir) / "activations" / rev / h for h in hooks}
  for hook, path in paths.items():
    log_fn(f"{rev} {hook}: caching activations into {path}")
    write_cache(path, model, batches, hook, cfg.cache_dtype, jax.process_index(),
                jax.process_count(), log_fn=log_fn)
  distributed.barrier(f"cache {rev} written")
  return paths


def _cached_rows(cfg: TraceConfig, model, rev: str, hooks, workdir: Path, log_fn):
  """Cache mode: every host extracts its batches of each hook, then all read every cache."""
  from sae_jax.data.cache import CacheReader, MultiCacheReader
  paths = write_caches(cfg, model, rev, hooks, workdir, log_fn)
  return MultiCacheReader({h: CacheReader(p, seed=cfg.data.seed) for h, p in paths.items()})


def _train_pairs(cfg: TraceConfig, model, rev: str, todo, overwrite: bool, log_fn,
                 workdir: Path, warm: dict | None = None):
  """Train the SAEs of one checkpoint: every hook's SAE from one shared model forward (stream
  mode) or from the hooks' caches read side by side (cache mode)."""
  d = model.cfg.d_model
  sae_cfg = cfg.sae.replace(d_in=d, d_sae=cfg.expansion * d if cfg.expansion else cfg.sae.d_sae)
  hooks = list(dict.fromkeys(h for h, _, _ in todo))
  if cfg.activations == "cache":
    rows = _cached_rows(cfg, model, rev, hooks, workdir, log_fn)
  else:
    rows = sj_data.multi_hook_rows(model, cfg.data, hooks)
  # Only process 0 evaluates, on the whole held-out stream (not its shard of it), so eval.json
  # does not depend on the number of hosts.
  eval_batches = sj_data.token_batches(model, cfg.data.replace(seed=cfg.data.seed + 7919), 0, 1)

  def finisher(hook):
    def finish(sae, run):
      lm = evals.spliced_metrics(model, sae, hook, eval_batches, cfg.eval_batches)
      store.atomic_write_json(run.eval, {**sae.metadata.get("eval", {}), **lm})
      for fmt in cfg.exports:
        try:
          sae.export(run.path / "exports" / fmt, format=fmt)
        except ConfigError as e:  # e.g. sparsify cannot hold a unit-norm SAE: say so, go on
          log_fn(f"{rev} {hook}: not exported as {fmt}: {e}")
    return finish

  jobs = [SAEJob(sae_cfg, cfg.train, pair.path, hook=hook, name=pair.path.name,
                 on_complete=finisher(hook), init_seed=cfg.train.seed + seed if seed else None,
                 init_params=(warm or {}).get(hook) if not seed else None,
                 metadata={"model_name": str(cfg.model), "revision": rev, "hook_name": hook,
                           "normalize": sae_cfg.normalize, "baseline_seed": seed})
          for hook, pair, seed in todo]
  train_saes(rows, jobs, overwrite=overwrite, log_fn=log_fn)


def _summary_row(rev: str, path: Path, hook: str, pair: store.RunDir) -> dict:
  ev = store.read_json(pair.eval) if pair.eval.exists() else {}
  row = {"checkpoint": rev, "step": checkpoint_step(rev, path), "hook": hook}
  row.update({k: ev.get(k, float("nan")) for k in SUMMARY_FIELDS[3:]})
  return row


def _csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def _table(rows: list[dict]) -> str:
  cols = ("checkpoint", "hook", "fvu", "l0", "dead_fraction", "ce_loss_recovered",
          "delta_lm_loss")
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = [" ".join(f"{c:>17}" for c in cols)]
  lines += [" ".join(f"{fmt(r[c]):>17}" for c in cols) for r in rows]
  return "\n".join(lines)
