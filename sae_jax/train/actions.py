"""Periodic actions of the fit loop: log, evaluate, agree on a preemption, checkpoint.

Each action is called after every step with the :class:`~sae_jax.train.loop.Trainer` and the
number of batches served so far, and decides itself whether it is due (in the spirit of flax's
``periodic_actions`` and levanter's trainer hooks). Order matters: the preemption agreement
runs before the checkpoint, which saves at the agreed batch, before the exit.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import logging

from sae_jax import console, distributed, evals, paths, store
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import DataError, Preempted
from sae_jax.saes.sae import SAE
from sae_jax.train.tensorboard import EventWriter

if TYPE_CHECKING:  # typing only: the loop imports this module
  from sae_jax.train.loop import Trainer

# Multi-host runs agree on a SIGTERM every this many batches (a tiny collective).
SIGTERM_AGREE_EVERY = 8


class SigtermFlag:
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


class MetricLog:
  """metrics.jsonl + TensorBoard of a run directory (no-ops without one, and on hosts other
  than process 0: one writer in a multi-host run)."""

  def __init__(self, run: store.RunDir | None, resume_step: int | None):
    run = run if distributed.is_primary() else None
    self.run = run
    self._jsonl = self._tb = None
    if run is None:
      return
    if resume_step is not None and run.metrics.exists():
      # Records written after the checkpoint we resume from will be written again.
      kept = [line for line in run.metrics.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      store.atomic_write_text(run.metrics, "".join(line + "\n" for line in kept))
    self._jsonl = paths.AppendFile(run.metrics)  # on a bucket: rewritten whole on flush
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
      self._jsonl = None


def check_nan_budget(state, tcfg: TrainConfig) -> None:
  """Stop the run once more batches were non-finite than the budget allows."""
  skipped = int(state.nan_batches)
  if skipped > tcfg.run.max_nan_batches:
    raise DataError(f"{skipped} batches contained NaN/Inf activations, more than "
                    f"max_nan_batches={tcfg.run.max_nan_batches}; check the activation source")


def progress_line(served: int, total: int | None, start: int, batch: int, elapsed: float,
                  m: dict[str, float]) -> str:
  """``step 40/400 12,345 tok/s fvu 0.4312 dead 0.000 l0 32.0 eta 30s``: one progress line
  (every metric is in metrics.jsonl)."""
  rate = (served - start) * batch / max(elapsed, 1e-9)
  where = f"step {served}" + (f"/{total}" if total else "")
  shown = "".join(f" {label} {m[k]:{fmt}}" for k, label, fmt in
                  (("fvu", "fvu", ".4f"), ("dead_fraction", "dead", ".3f"), ("l0", "l0", ".1f"))
                  if k in m)
  eta = ""
  if total:
    eta = f" eta {_duration(max(total - served, 0) * batch / max(rate, 1e-9))}"
  return f"{where} {rate:,.0f} tok/s{shown}{eta}"


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else \
      f"{s // 3600}h{s // 60 % 60:02d}m"


def evaluate(sae_config: SAEConfig, state, rows) -> dict:
  """Reconstruction metrics of the current parameters on held-out rows [n, d_in]."""
  if jax.process_count() > 1:  # this host's held-out rows, against a host copy of the params
    sae = SAE(sae_config, distributed.to_host(state.params), distributed.to_host(state.buffers))
  else:
    sae = SAE(sae_config, state.params, state.buffers)
  return evals.reconstruction_metrics(sae, rows)


def log_metrics(t: Trainer, served: int) -> None:
  """Every ``log_every`` steps (and the last): metrics to the log files, a progress line, the
  NaN budget."""
  for r in t.active:
    if served % r.tcfg.run.log_every == 0 or served == t.total:
      r.last = {k: float(v) for k, v in r.metrics.items()}
      check_nan_budget(r.state, r.tcfg)
      r.log.write(served, "train", r.last)
  # One live line for the fit: each SAE's part side by side (their steps and rate agree).
  due = [r for r in t.active if served % r.tcfg.run.log_every == 0 or served == t.total]
  if due:
    first = progress_line(served, t.total, t.start, t.batch_size, t.elapsed(), due[0].last)
    if len(t.active) > 1:
      parts = [f"[{r.label}] fvu {r.last.get('fvu', float('nan')):.4f} dead "
               f"{r.last.get('dead_fraction', float('nan')):.3f}" for r in due]
      first = first.split(" fvu ")[0] + " " + " ".join(parts) + (
          " eta" + first.split(" eta")[1] if " eta" in first else "")
    (console.last if served == t.total else console.live)(t.log_fn)(first)


def evaluate_periodically(t: Trainer, served: int) -> None:
  """Every ``eval_every`` steps: reconstruction metrics on the held-out rows."""
  if t.eval_rows is None:
    return
  for r in t.active:
    if r.tcfg.run.eval_every and served % r.tcfg.run.eval_every == 0:
      r.log.write(served, "eval", evaluate(r.cfg, r.state, r.rows(t.eval_rows)))


def agree_on_preemption(t: Trainer, served: int) -> None:
  """Whether to stop here: this host's SIGTERM, or on several hosts, the hosts' agreement at a
  batch every host reaches (they get the notice at different batches)."""
  stop = t.sigterm.raised
  if jax.process_count() > 1:
    stop = ((served % SIGTERM_AGREE_EVERY == 0 or served == t.total)
            and distributed.any_process(stop))
  t.stop_requested = stop


def checkpoint(t: Trainer, served: int) -> None:
  """Every ``checkpoint_every`` steps, and at an agreed preemption: every job's state and the
  data position, at the same batch."""
  if not (served % t.tcfg.run.checkpoint_every == 0 or t.stop_requested):
    return
  for r in t.active:
    if r.ckpt is not None:
      r.ckpt.save(served, r.state, t.stream.position())
      r.log.flush()
      if served % r.tcfg.run.log_every == 0:
        r.log.write(served, "checkpoint", {"save_blocking_s": r.ckpt.last_save_blocking_s})


def exit_if_preempted(t: Trainer, served: int) -> None:
  """After the preemption checkpoint: wait for it, then exit with status 143."""
  if not t.stop_requested:
    return
  saved = any(r.ckpt is not None for r in t.active)
  for r in t.active:
    if r.ckpt is not None:
      r.ckpt.wait()
  note = (f"SIGTERM at batch {served}: " + ("checkpointed" if saved else
          "no workdir, nothing saved") + "; rerun with the same workdir to resume")
  logging.warning(note)
  raise Preempted(note)


DEFAULT_ACTIONS = (log_metrics, evaluate_periodically, agree_on_preemption, checkpoint,
                   exit_if_preempted)
