"""The fit loop: batches in, a trained SAE out; resumable, logged, evaluated.

With a ``workdir`` the run lives in a :class:`sae_jax.store.RunDir`: Orbax checkpoints of the
train state and the data position every ``checkpoint_every`` steps and on SIGTERM, metrics in
``metrics.jsonl`` and TensorBoard files, the final SAE in ``sae/`` and ``COMPLETE`` last. A
restart with the same workdir continues from the newest good checkpoint and gives bit-identical
parameters to a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sae_jax import __version__, distributed, evals, sharding, store
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError, DataError, Preempted
from sae_jax.saes.sae import SAE
from sae_jax.train.checkpoint import Checkpointer, abstract_state
from sae_jax.train.data import BatchStream
from sae_jax.train.state import _init_state, init_train_state
from sae_jax.train.step import METRIC_NAMES, make_train_step
from sae_jax.train.tensorboard import EventWriter


class _SigtermFlag:
  """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _RunLog:
  """metrics.jsonl + TensorBoard for a run directory (no-ops without one)."""

  def __init__(self, run: store.RunDir | None, resume_step: int | None):
    run = run if distributed.is_primary() else None  # one writer in a multi-host run
    self.run = run
    self._jsonl = self._tb = None
    if run is None:
      return
    if resume_step is not None and run.metrics.exists():
      # Records written after the checkpoint we resume from will be written again.
      kept = [line for line in run.metrics.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      store.atomic_write_text(run.metrics, "".join(line + "\n" for line in kept))
    self._jsonl = open(run.metrics, "a")
    self._tb = EventWriter(run.tensorboard)

  def write(self, step: int, split: str, values: dict) -> None:
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self._tb.scalars(step, {f"{split}/{k}": v for k, v in values.items()
                            if isinstance(v, (int, float)) and np.isfinite(v)})

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()


def _run_config(sae_config: SAEConfig, tcfg: TrainConfig) -> dict:
  return {"sae": sae_config.to_dict(), "train": tcfg.to_dict()}


def _check_same_run(run: store.RunDir, current: dict, overwrite: bool) -> None:
  """Refuse a workdir holding a different run (unless overwrite: then start it afresh)."""
  if not run.config.exists():
    return
  saved = store.read_json(run.config)
  skip = set(TrainConfig.RESTART_SAFE)
  if current["train"].get("lr_schedule") == "constant":
    skip.add("total_tokens")  # a constant schedule can be extended
  norm = lambda c: {**c, "train": {k: v for k, v in c.get("train", {}).items() if k not in skip}}
  diffs = store.config_differences(norm(saved), norm(current))
  if not diffs:
    return
  if not overwrite:
    raise ConfigError(f"workdir {run.path} holds a run with a different config ("
                      + "; ".join(diffs[:6]) + "); use another workdir or overwrite=True")
  logging.warning("overwrite=True: discarding the run in %s (%s)", run.path, "; ".join(diffs))
  distributed.barrier(f"overwrite-check {run.path}")  # every host has read it before it goes
  if not distributed.is_primary():
    return
  for p in (run.state, run.sae, run.tensorboard):
    shutil.rmtree(p, ignore_errors=True)
  for p in (run.metrics, run.eval, run.complete_marker, run.config):
    p.unlink(missing_ok=True)


@dataclasses.dataclass
class SAEJob:
  """One SAE to train from a shared activation stream (see :func:`train_saes`)."""

  sae_config: SAEConfig
  train_config: TrainConfig
  workdir: str | Path | None = None
  metadata: dict | None = None
  on_complete: Callable[[SAE, store.RunDir], None] | None = None
  name: str = ""
  hook: str | None = None  # with a multi-hook source ({hook: rows} chunks): the rows to train on
  init_seed: int | None = None  # parameter init seed (default: train_config.seed)
  init_params: dict | None = None  # warm start from another SAE's parameters


# Multi-host runs agree on a SIGTERM every this many batches (a tiny collective).
_SIGTERM_AGREE_EVERY = 8

# TrainConfig fields that shape the shared batch stream: equal across the SAEs of one stream.
_STREAM_FIELDS = ("batch_size", "total_tokens", "seed", "shuffle_batches", "eval_tokens")


def train_sae(activations: np.ndarray | Iterable[np.ndarray], sae_config: SAEConfig,
              train_config: TrainConfig, workdir: str | Path | None = None,
              mesh: Mesh | None = None, *, eval_activations: np.ndarray | None = None,
              overwrite: bool = False, metadata: dict | None = None,
              on_complete: Callable[[SAE, store.RunDir], None] | None = None,
              log_fn: Callable[[str], None] = logging.info) -> SAE:
  """Train an SAE on activations [n, d_in] (an array, or any iterable of such batches).

  Args:
    activations: an in-memory array (shuffled, repeated up to total_tokens), an iterable of
      [n_i, d_in] arrays (re-batched, shuffled within a buffer), or a source with
      ``rows_from(n)`` (``sj.data.hook_rows``, a cache reader) that restarts at any row.
      Resuming a plain iterable re-reads it from the start: pass a re-iterable one.
    sae_config, train_config: what to train and how.
    workdir: run directory for checkpoints, metrics and the final SAE; a rerun resumes it, and
      a finished one is simply loaded. None: in memory only.
    mesh: a ("data", "model") mesh; default: every device on "data".
    eval_activations: held-out [m, d_in] activations (else ``eval_tokens`` rows are held out).
    overwrite: discard a run with a different config found in ``workdir`` instead of refusing.
    metadata: provenance stored with the SAE (model, revision, hook, ...).
    on_complete: called with the SAE and the run directory after the SAE is saved and before
      COMPLETE is written (the trace evaluates and exports there); must be idempotent.
    log_fn: where the progress lines go.

  Returns:
    The trained SAE; ``sae.metadata`` holds provenance, tokens seen and the final metrics.
  """
  job = SAEJob(sae_config, train_config, workdir, metadata, on_complete)
  return train_saes(activations, [job], mesh, eval_activations=eval_activations,
                    overwrite=overwrite, log_fn=log_fn)[0]


class _Job:
  """A job's run directory, compiled step, checkpointer, state and log while training."""

  def __init__(self, job: SAEJob, mesh: Mesh, overwrite: bool):
    self.job, self.cfg, self.tcfg = job, job.sae_config, job.train_config
    self.run = store.RunDir(job.workdir) if job.workdir is not None else None
    self.done_sae = None
    if self.run is not None:
      _check_same_run(self.run, _run_config(self.cfg, self.tcfg), overwrite)
      if self.run.is_complete():
        from sae_jax.formats import load_sae
        self.done_sae = load_sae(self.run.sae)
        return
      self.run.ensure()
      if distributed.is_primary():
        store.atomic_write_json(self.run.config, _run_config(self.cfg, self.tcfg))
    self.step = make_train_step(self.cfg, self.tcfg, mesh)
    self.ckpt = (Checkpointer(self.run.state, self.tcfg.keep_checkpoints)
                 if self.run is not None else None)
    self.state, self.log, self.metrics, self.last = None, None, None, {}

  def abstract(self):
    shapes = jax.eval_shape(lambda: _init_state(self.cfg, self.tcfg, None, jax.random.key(0)))
    return abstract_state(self.step.state_shardings, shapes)

  def close(self):
    if self.log is not None:
      self.log.close()
    if getattr(self, "ckpt", None) is not None:
      with contextlib.suppress(Exception):
        self.ckpt.close()


def _restore_common(jobs: list[_Job]) -> dict | None:
  """Restore every job at the newest checkpoint step they all have; returns its position."""
  if any(j.ckpt is None or not j.ckpt.steps() for j in jobs):
    return None
  common = set.intersection(*(set(j.ckpt.steps()) for j in jobs))
  while common:
    s = max(common)
    got = [j.ckpt.restore_latest(j.abstract(), only={s}) for j in jobs]
    if all(g is not None for g in got):
      for j, (state, _) in zip(jobs, got):
        j.state = state
      return got[0][1]
    common = set.intersection(*(set(j.ckpt.steps()) for j in jobs)) & {x for x in common if x < s}
  return None


def train_saes(activations, jobs: list[SAEJob], mesh: Mesh | None = None, *,
               eval_activations: np.ndarray | None = None, overwrite: bool = False,
               log_fn: Callable[[str], None] = logging.info) -> list[SAE]:
  """Train several SAEs side by side on one activation stream (one model forward feeds all).

  Every job sees the same batches (or, from ``sj.data.multi_hook_rows``, its own hook's rows of
  the same tokens: set ``SAEJob.hook``); their TrainConfigs must agree on the fields that shape
  the stream (batch_size, total_tokens, seed, shuffle_batches, eval_tokens) and their d_in;
  ``init_seed`` gives each job its own initialisation.
  Checkpoints of all jobs are taken at the same batch, and a restart resumes all of them from
  the newest batch they all hold, so each SAE equals the one trained alone.
  """
  if not jobs:
    raise ConfigError("train_saes needs at least one SAEJob")
  first_cfg = jobs[0].train_config
  for j in jobs[1:]:
    diffs = [f for f in _STREAM_FIELDS if getattr(j.train_config, f) != getattr(first_cfg, f)]
    if diffs or (j.hook is None and j.sae_config.d_in != jobs[0].sae_config.d_in):
      raise ConfigError(f"SAEs sharing a stream must agree on {diffs or ['d_in']}")
  mesh = mesh or sharding.make_mesh()
  runs = [_Job(j, mesh, overwrite) for j in jobs]
  active = [r for r in runs if r.done_sae is None]
  for r in runs:
    if r.done_sae is not None:
      log_fn(f"{r.run.path} is complete; loading its SAE")
  if not active:
    return [r.done_sae for r in runs]
  tcfg, d_in = first_cfg, jobs[0].sae_config.d_in
  stream = BatchStream(activations, tcfg.batch_size, d_in, tcfg.seed, tcfg.total_tokens,
                       tcfg.shuffle_batches, 0 if eval_activations is not None else tcfg.eval_tokens,
                       jax.process_index(), jax.process_count(),
                       distributed.all_processes if jax.process_count() > 1 else None)
  try:
    return _fit(runs, active, stream, mesh, eval_activations, log_fn)
  finally:
    for r in active:
      r.close()


def _fit(runs, active, stream, mesh, eval_activations, log_fn) -> list[SAE]:
  tcfg = active[0].tcfg
  t0 = time.perf_counter()
  position = _restore_common(active)
  resume_step = None
  if position is not None:
    stream.restore(position)
    resume_step = stream.served
    log_fn(f"resumed at batch {stream.served} (step {int(active[0].state.step)}) in "
           f"{time.perf_counter() - t0:.1f}s")
  batches = iter(stream)
  if position is None:
    try:
      first = next(batches)
    except StopIteration:
      raise DataError(f"no full batch of {tcfg.batch_size} tokens in the activations") from None
    first_global = distributed.gather_rows(first)  # every host initialises from the same rows
    for r in active:
      key = None if r.job.init_seed is None else jax.random.key(r.job.init_seed)
      r.state = init_train_state(r.cfg, r.tcfg, mesh, _rows_for(r, first_global), key,
                                 r.job.init_params)
    batches = _prepend(first, batches)
  eval_rows = eval_activations if eval_activations is not None else stream.eval_rows
  total = stream.total_batches
  for r in active:
    log_fn(f"training {r.cfg.architecture} SAE d_in={r.cfg.d_in} d_sae={r.cfg.d_sae} "
           f"k={r.cfg.k} on {mesh.devices.size} device(s), {tcfg.batch_size} tokens/step"
           + (f", {total} steps" if total else "") + (f" -> {r.run.path}" if r.run else ""))
    r.log = _RunLog(r.run, resume_step)
  t0, start = time.perf_counter(), stream.served
  x_sharding = active[0].step.x_sharding
  multi_host = jax.process_count() > 1
  with _SigtermFlag() as sigterm:
    for batch in batches:
      shared = None if isinstance(batch, dict) else distributed.to_global(batch, x_sharding)
      served = stream.served
      for r in active:
        x = shared if shared is not None else distributed.to_global(_rows_for(r, batch),
                                                                    x_sharding)
        r.state, r.metrics = r.step(r.state, x)
        if served % r.tcfg.log_every == 0 or served == total:
          r.last = {k: float(v) for k, v in r.metrics.items()}
          _check_nan_budget(r.state, r.tcfg)
          r.log.write(served, "train", r.last)
          tag = f"[{r.job.name or r.cfg.architecture}] " if len(active) > 1 else ""
          log_fn(tag + _progress_line(served, total, start, tcfg.batch_size,
                                      time.perf_counter() - t0, r.last))
        if eval_rows is not None and r.tcfg.eval_every and served % r.tcfg.eval_every == 0:
          r.log.write(served, "eval", _evaluate(r.cfg, r.state, _rows_for(r, eval_rows)))
      stop = sigterm.raised
      if multi_host:
        # Hosts get the notice at different batches; they stop (and save) at one they agree on.
        stop = ((served % _SIGTERM_AGREE_EVERY == 0 or served == total)
                and distributed.any_process(stop))
      if served % tcfg.checkpoint_every == 0 or stop:
        for r in active:
          if r.ckpt is not None:
            r.ckpt.save(served, r.state, stream.position())
            r.log.flush()
            if served % r.tcfg.log_every == 0:
              r.log.write(served, "checkpoint", {"save_blocking_s": r.ckpt.last_save_blocking_s})
      if stop:
        saved = any(r.ckpt is not None for r in active)
        for r in active:
          if r.ckpt is not None:
            r.ckpt.wait()
        note = (f"SIGTERM at batch {served}: " + ("checkpointed" if saved else
                "no workdir, nothing saved") + "; rerun with the same workdir to resume")
        logging.warning(note)
        raise Preempted(note)
  for r in active:
    if r.metrics is not None:
      r.last = {k: float(v) for k, v in r.metrics.items()}
    _check_nan_budget(r.state, r.tcfg)
    # Decided from what this run saved, not from the directory: another host may not see a
    # checkpoint's final name yet, and every host must take the same (collective) save.
    if r.ckpt is not None and r.ckpt.last_saved_step != stream.served:
      r.ckpt.save(stream.served, r.state, stream.position())  # a kill below resumes here
  for r in active:
    if r.ckpt is not None:
      r.ckpt.wait()
  for r in active:
    meta = {**(r.job.metadata or {}), "tokens_seen": int(r.state.step) * tcfg.batch_size,
            "steps": int(r.state.step), "nan_batches": int(r.state.nan_batches),
            "final_metrics": r.last, "train_config": r.tcfg.to_dict(),
            "sae_jax_version": __version__}
    sae = SAE(r.cfg, distributed.to_host(r.state.params), distributed.to_host(r.state.buffers),
              meta)
    if eval_rows is not None:
      sae.metadata["eval"] = evals.reconstruction_metrics(sae, _rows_for(r, eval_rows))
      r.log.write(stream.served, "eval", sae.metadata["eval"])
    if r.run is not None and distributed.is_primary():
      sae.save(r.run.sae)
      store.atomic_write_json(r.run.eval, sae.metadata.get("eval", {}))
      r.log.close()
      if r.job.on_complete is not None:
        r.job.on_complete(sae, r.run)
      r.run.mark_complete({"steps": int(r.state.step), "tokens_seen": meta["tokens_seen"]})
    r.done_sae = sae
  distributed.barrier("train_saes: saved")  # no host moves on before the SAEs are marked done
  return [r.done_sae for r in runs]


def _rows_for(r: _Job, rows):
  """This job's rows of a batch: the batch itself, or its hook's entry of a multi-hook batch."""
  if not isinstance(rows, dict):
    return rows
  if r.job.hook not in rows:
    raise ConfigError(f"SAEJob.hook={r.job.hook!r} is not among the source's hooks "
                      f"{sorted(rows)}")
  return rows[r.job.hook]


def _prepend(first, rest):
  yield first
  yield from rest


def _evaluate(sae_config: SAEConfig, state, rows) -> dict:
  if jax.process_count() > 1:  # this host's held-out rows, against a host copy of the params
    sae = SAE(sae_config, distributed.to_host(state.params), distributed.to_host(state.buffers))
  else:
    sae = SAE(sae_config, state.params, state.buffers)
  return evals.reconstruction_metrics(sae, rows)


def _check_nan_budget(state, tcfg: TrainConfig) -> None:
  skipped = int(state.nan_batches)
  if skipped > tcfg.max_nan_batches:
    raise DataError(f"{skipped} batches contained NaN/Inf activations, more than "
                    f"max_nan_batches={tcfg.max_nan_batches}; check the activation source")


def _progress_line(served: int, total: int | None, start: int, batch: int, elapsed: float,
                   m: dict[str, float]) -> str:
  rate = (served - start) * batch / max(elapsed, 1e-9)
  where = f"step {served}" + (f"/{total}" if total else "")
  eta = ""
  if total:
    eta = f" eta {max(total - served, 0) * batch / max(rate, 1e-9):.0f}s"
  shown = " ".join(f"{k}={m[k]:.4g}" for k in METRIC_NAMES if k in m and k != "skipped")
  return f"{where} {rate:,.0f} tok/s{eta} {shown}"
