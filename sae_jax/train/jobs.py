"""What is trained: one SAEJob per SAE, and its state while the fit loop runs.

A job with a workdir lives in a :class:`sae_jax.store.RunDir`: ``config.json`` (the configs it
was started with: a restart must match them), Orbax checkpoints in ``state/``, the final SAE in
``sae/``. A finished run is loaded instead of trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Protocol

import jax
from absl import logging
from jax.sharding import Mesh

from sae_jax import distributed, paths, store
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError
from sae_jax.formats import load_sae
from sae_jax.saes.sae import SAE
from sae_jax.train.checkpoint import Checkpointer, abstract_state
from sae_jax.train.state import _init_state
from sae_jax.train.step import make_train_step


# The key of a single-source batch in the fit loop's {hook: rows} batches.
SINGLE = None


class CompletionHook(Protocol):
  """Called once per finished SAE, after it is saved and before COMPLETE is written (so it
  runs again if the process dies in between: it must be idempotent). On process 0 only, unless
  the hook has ``collective = True`` (it runs collectives across processes): then on every
  process, which must leave the writing to process 0."""

  def __call__(self, sae: SAE, run: store.RunDir) -> None: ...


@dataclasses.dataclass
class SAEJob:
  """One SAE to train from a shared activation stream (see :func:`train_saes`).

  Attributes:
    sae_config, train_config: what to train and how.
    workdir: its run directory (None: in memory only).
    metadata: provenance stored with the SAE.
    on_complete: the completion hook (the trace evaluates and exports there).
    name: shown in progress lines when several SAEs train side by side.
    hook: with a multi-hook source ({hook: rows} batches), the rows this SAE trains on.
    init_seed: parameter init seed (default: ``train_config.seed``).
    init_params: warm start from another SAE's parameters.
  """

  sae_config: SAEConfig
  train_config: TrainConfig
  workdir: str | Path | None = None
  metadata: dict | None = None
  on_complete: CompletionHook | Callable[[SAE, store.RunDir], None] | None = None
  name: str = ""
  hook: str | None = None
  init_seed: int | None = None
  init_params: dict | None = None


def run_config(sae_config: SAEConfig, tcfg: TrainConfig) -> dict:
  """What ``config.json`` of a run directory holds."""
  return {"sae": sae_config.to_dict(), "train": tcfg.to_dict()}


def _comparable(config: dict) -> dict:
  """A run config in today's layout, without the fields a restart may change."""
  try:  # a config.json written before the config split compares in today's layout
    config = run_config(SAEConfig.from_dict(config["sae"]),
                        TrainConfig.from_dict(config["train"]))
  except (KeyError, TypeError, ConfigError):
    pass  # compared as it is: it differs, and the difference is reported
  train = {k: v for k, v in config.get("train", {}).items() if k not in TrainConfig.RESTART_SAFE}
  if train.get("optim", {}).get("lr_schedule") == "constant":
    train.pop("total_tokens", None)  # a constant schedule can be extended
  return {**config, "train": train}


def check_same_run(run: store.RunDir, current: dict, overwrite: bool) -> None:
  """Refuse a workdir holding a different run (unless overwrite: then start it afresh)."""
  if not run.config.exists():
    return
  diffs = store.config_differences(_comparable(store.read_json(run.config)),
                                   _comparable(current))
  if not diffs:
    return
  if not overwrite:
    raise ConfigError(f"workdir {run.path} holds a run with a different config ("
                      + "; ".join(diffs[:6]) + "); use another workdir or overwrite=True")
  logging.warning("overwrite=True: discarding the run in %s (%s)", run.path, "; ".join(diffs))
  distributed.barrier(f"overwrite-check {run.path}")  # every host has read it before it goes
  if distributed.is_primary():
    discard(run)


def discard(run: store.RunDir) -> None:
  """Delete everything a run wrote (its directory stays)."""
  for p in (run.state, run.sae, run.tensorboard):
    paths.rmtree(p)
  for p in (run.metrics, run.eval, run.complete_marker, run.config):
    p.unlink(missing_ok=True)


class ActiveJob:
  """A job while it trains: its run directory, compiled step, checkpointer, state, log.

  ``done_sae`` is set instead when the run directory holds a finished SAE.
  """

  def __init__(self, job: SAEJob, mesh: Mesh, overwrite: bool):
    self.job, self.cfg, self.tcfg = job, job.sae_config, job.train_config
    self.run = store.RunDir(job.workdir) if job.workdir is not None else None
    self.done_sae: SAE | None = None
    self.ckpt: Checkpointer | None = None
    self.state, self.log, self.metrics, self.last = None, None, None, {}
    if self.run is not None:
      check_same_run(self.run, run_config(self.cfg, self.tcfg), overwrite)
      if self.run.is_complete():
        self.done_sae = load_sae(self.run.sae)
        return
      self.run.ensure()
      if distributed.is_primary():
        store.atomic_write_json(self.run.config, run_config(self.cfg, self.tcfg))
      self.ckpt = Checkpointer(self.run.state, self.tcfg.run.keep_checkpoints)
    self.step = make_train_step(self.cfg, self.tcfg, mesh)

  @property
  def label(self) -> str:
    return self.job.name or self.cfg.architecture

  def rows(self, batch: dict):
    """This job's rows of a {hook: rows} batch (a single-source batch: its only entry)."""
    if list(batch) == [SINGLE]:
      return batch[SINGLE]
    if self.job.hook not in batch:
      raise ConfigError(f"SAEJob.hook={self.job.hook!r} is not among the source's hooks "
                        f"{sorted(batch, key=str)}")
    return batch[self.job.hook]

  def abstract(self):
    shapes = jax.eval_shape(lambda: _init_state(self.cfg, self.tcfg, None, jax.random.key(0)))
    return abstract_state(self.step.state_shardings, shapes)

  def close(self):
    if self.log is not None:
      self.log.close()
    if self.ckpt is not None:
      with contextlib.suppress(Exception):
        self.ckpt.close()


def restore_common(jobs: list[ActiveJob]) -> dict | None:
  """Restore every job at the newest checkpoint step they all have; returns its data
  position (None: nothing to resume)."""
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
