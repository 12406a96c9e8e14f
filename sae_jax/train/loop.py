"""The fit loop: batches in, trained SAEs out; resumable, logged, evaluated.

In phases: restore-or-init (the newest checkpoint every job holds, else initialise from the
first batch), steps with periodic actions after each (``actions.py``: log, evaluate,
preemption agreement, checkpoint), then finalise (final checkpoint, save the SAE, the job's
completion hook, COMPLETE last). With a ``workdir`` a run lives in a
:class:`sae_jax.store.RunDir`; a restart continues from the newest good checkpoint and gives
bit-identical parameters to a run that was never interrupted.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sae_jax import console, distributed, evals, sharding, store
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.data.device_mix import device_batches
from sae_jax.errors import ConfigError, DataError
from sae_jax.saes import registry
from sae_jax.saes.sae import SAE
from sae_jax.train import actions
from sae_jax.train.data import BatchStream
from sae_jax.train.jobs import SINGLE, ActiveJob, SAEJob, restore_common
from sae_jax.train.state import init_train_state, long_warmup_message
from sae_jax.version import __version__

def train_sae(activations: np.ndarray | Iterable[np.ndarray], sae_config: SAEConfig,
              train_config: TrainConfig, workdir: str | Path | None = None,
              mesh: Mesh | None = None, *, eval_activations: np.ndarray | None = None,
              overwrite: bool = False, metadata: dict | None = None,
              on_complete: Callable[[SAE, store.RunDir], None] | None = None,
              log_fn: Callable[[str], None] = logging.info) -> SAE:
  """Train an SAE on activations [n, d_in] (an array, or any iterable of such batches).

  Args:
    activations: an in-memory array (shuffled, repeated up to total_tokens), an iterable of
      [n_i, d_in] arrays (re-batched, shuffled within a buffer), a source with
      ``rows_from(n)`` (a cache reader) that restarts at any row, or the activation producer
      (``sj.data.hook_rows``), whose rows are mixed on the devices and never reach the host
      (``sae_jax.data.device_mix``). Resuming a plain iterable re-reads it from the start:
      pass a re-iterable one.
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


def train_saes(activations, jobs: list[SAEJob], mesh: Mesh | None = None, *,
               eval_activations: np.ndarray | None = None, overwrite: bool = False,
               log_fn: Callable[[str], None] = logging.info) -> list[SAE]:
  """Train several SAEs side by side on one activation stream (one model forward feeds all).

  Every job sees the same batches (or, from ``sj.data.multi_hook_rows``, its own hook's rows of
  the same tokens: set ``SAEJob.hook``); their TrainConfigs must agree on the fields that shape
  the stream (``TrainConfig.STREAM_FIELDS``) and their d_in; ``init_seed`` gives each job its
  own initialisation. Checkpoints of all jobs are taken at the same batch, and a restart
  resumes all of them from the newest batch they all hold, so each SAE equals the one trained
  alone.
  """
  _check_jobs(jobs)
  mesh = mesh or sharding.make_mesh()
  runs = [ActiveJob(j, mesh, overwrite) for j in jobs]
  for r in runs:
    if r.done_sae is not None:
      log_fn(f"{r.run.path} is complete; loading its SAE")
  active = [r for r in runs if r.done_sae is None]
  if not active:
    return [r.done_sae for r in runs]
  tcfg = jobs[0].train_config
  holdout = 0 if eval_activations is not None else tcfg.eval_tokens
  # The producer's rows stay on the devices (mixed there); other sources go through the host.
  stream = device_batches(activations, mesh, tcfg.batch_size, tcfg.total_tokens, holdout,
                          jobs[0].sae_config.d_in)
  if stream is None:
    stream = BatchStream(activations, tcfg.batch_size, jobs[0].sae_config.d_in, tcfg.seed,
                         tcfg.total_tokens, tcfg.shuffle_batches, holdout,
                         jax.process_index(), jax.process_count(),
                         distributed.all_processes if jax.process_count() > 1 else None)
  try:
    Trainer(active, stream, mesh, eval_activations, log_fn).fit()
  finally:
    for r in active:
      r.close()
  return [r.done_sae for r in runs]


def _check_jobs(jobs: Sequence[SAEJob]) -> None:
  """Everything about the jobs that can be wrong, before any compilation."""
  if not jobs:
    raise ConfigError("train_saes needs at least one SAEJob")
  first = jobs[0].train_config
  for j in jobs:
    registry.check(j.sae_config)
    diffs = [f for f in TrainConfig.STREAM_FIELDS
             if getattr(j.train_config, f) != getattr(first, f)]
    if diffs or (j.hook is None and j.sae_config.d_in != jobs[0].sae_config.d_in):
      raise ConfigError(f"SAEs sharing a stream must agree on {diffs or ['d_in']}")


def _by_hook(rows):
  """Every source in the loop is {hook: rows}: a single-hook batch is keyed by SINGLE."""
  if rows is None or isinstance(rows, dict):
    return rows
  return {SINGLE: rows}


class Trainer:
  """One fit of several jobs over one stream. ``fit`` runs the phases; the periodic actions
  read and set the attributes below."""

  def __init__(self, active: list[ActiveJob], stream: BatchStream, mesh: Mesh,
               eval_activations, log_fn, periodic=actions.DEFAULT_ACTIONS):
    self.active, self.stream, self.mesh, self.log_fn = active, stream, mesh, log_fn
    self.tcfg = active[0].tcfg
    self.batch_size = self.tcfg.batch_size
    self.periodic = periodic
    self.eval_activations = eval_activations
    self.eval_rows = None
    self.total = stream.total_batches
    self.start, self.t0 = 0, time.perf_counter()
    self.stop_requested = False
    self.sigterm = None

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def fit(self) -> None:
    batches = self.restore_or_init()
    self.eval_rows = _by_hook(self.eval_activations if self.eval_activations is not None
                              else self.stream.eval_rows)
    self.t0, self.start = time.perf_counter(), self.stream.served
    x_sharding = self.active[0].step.x_sharding
    with actions.SigtermFlag() as self.sigterm:
      for batch in batches:
        batch = _by_hook(batch)
        shared = (distributed.to_global(batch[SINGLE], x_sharding)
                  if list(batch) == [SINGLE] else None)
        served = self.stream.served
        for r in self.active:
          x = shared if shared is not None else distributed.to_global(r.rows(batch), x_sharding)
          r.state, r.metrics = r.step(r.state, x)
        for action in self.periodic:
          action(self, served)
    self.finalise()

  def restore_or_init(self):
    """Resume every job from the newest checkpoint they all hold, or initialise each from the
    first batch; returns the batches still to train on."""
    t0 = time.perf_counter()
    position = restore_common(self.active)
    resume_step = None
    if position is not None:
      self.stream.restore(position)
      resume_step = self.stream.served
      # Start the stream now: its held-out rows are read first, and the evaluation needs
      # them even when the run resumes at its last batch (nothing left to train).
      batches = iter(self.stream)
      first = next(batches, None)
      batches = _prepend(first, batches) if first is not None else iter(())
      self.log_fn(f"resumed at batch {resume_step} (step "
                  f"{int(self.active[0].state.step)}) in {time.perf_counter() - t0:.1f}s")
    else:
      batches = iter(self.stream)
      try:
        first = next(batches)
      except StopIteration:
        raise DataError(f"no full batch of {self.batch_size} tokens in the activations"
                        ) from None
      first_global = _by_hook(distributed.gather_rows(first))  # every host inits alike
      for r in self.active:
        key = None if r.job.init_seed is None else jax.random.key(r.job.init_seed)
        r.state = init_train_state(r.cfg, r.tcfg, self.mesh, r.rows(first_global), key,
                                   r.job.init_params)
      batches = _prepend(first, batches)
    warned = set()
    for r in self.active:
      message = long_warmup_message(r.tcfg, self.total)
      if message and message not in warned:  # once per fit, however many jobs share it
        warned.add(message)
        warnings.warn(message, stacklevel=2)
        self.log_fn("WARNING: " + message)
      r.log = actions.MetricLog(r.run, resume_step)
    c = self.active[0].cfg
    where = [str(r.run.path) for r in self.active if r.run]
    # On the live line (and in the log file): a finished SAE's own line says what it became.
    console.live(self.log_fn)(
        f"training {len(self.active)} {c.architecture} SAE(s) d_in={c.d_in} d_sae={c.d_sae} "
        f"k={c.k} on {self.mesh.devices.size} device(s), {self.batch_size} tokens/step"
        + (f", {self.total} steps" if self.total else "")
        + (f" -> {_common_prefix(where)}" if where else ""))
    return batches

  def finalise(self) -> None:
    """Final checkpoint of every job, then each SAE saved, its completion hook, COMPLETE."""
    served = self.stream.served
    for r in self.active:
      if r.metrics is not None:
        r.last = {k: float(v) for k, v in r.metrics.items()}
      actions.check_nan_budget(r.state, r.tcfg)
      # Decided from what this run saved, not from the directory: another host may not see a
      # checkpoint's final name yet, and every host must take the same (collective) save.
      if r.ckpt is not None and r.ckpt.last_saved_step != served:
        r.ckpt.save(served, r.state, self.stream.position())  # a kill below resumes here
    for r in self.active:
      if r.ckpt is not None:
        r.ckpt.wait()
    for r in self.active:
      r.done_sae = self._finished_sae(r, served)
    distributed.barrier("train_saes: saved")  # no host moves on before the SAEs are marked done

  def _finished_sae(self, r: ActiveJob, served: int) -> SAE:
    steps = int(r.state.step)
    meta = {**(r.job.metadata or {}), "tokens_seen": steps * self.batch_size, "steps": steps,
            "nan_batches": int(r.state.nan_batches), "final_metrics": r.last,
            "train_config": r.tcfg.to_dict(), "sae_jax_version": __version__}
    sae = SAE(r.cfg, distributed.to_host(r.state.params), distributed.to_host(r.state.buffers),
              meta)
    if self.eval_rows is not None:
      sae.metadata["eval"] = evals.reconstruction_metrics(sae, r.rows(self.eval_rows))
      r.log.write(served, "eval", sae.metadata["eval"])
    if r.run is None:
      return sae
    primary, hook = distributed.is_primary(), r.job.on_complete
    if primary:
      sae.save(r.run.sae)
      store.atomic_write_json(r.run.eval, sae.metadata.get("eval", {}))
      r.log.close()
    # A collective hook (an evaluation on a mesh across processes) runs on every process, in
    # the same order of jobs; any other on process 0 only.
    if hook is not None and (primary or getattr(hook, "collective", False)):
      hook(sae, r.run)
    if primary:
      r.run.mark_complete({"steps": steps, "tokens_seen": meta["tokens_seen"]})
    return sae


def _prepend(first, rest):
  yield first
  yield from rest


def _common_prefix(paths: list[str]) -> str:
  """``runs/toy/step30/{resid_post.0,resid_post.0@seed1}`` for several run directories."""
  if len(paths) == 1:
    return paths[0]
  head = paths[0].rsplit("/", 1)[0]
  if all(p.rsplit("/", 1)[0] == head for p in paths):
    return head + "/{" + ",".join(p.rsplit("/", 1)[-1] for p in paths) + "}"
  return ", ".join(paths)
