"""The fit loop: batches in, a trained SAE out; resumable, logged, evaluated.

With a ``workdir`` the run lives in a :class:`sae_jax.store.RunDir`: Orbax checkpoints of the
train state and the data position every ``checkpoint_every`` steps and on SIGTERM, metrics in
``metrics.jsonl`` and TensorBoard files, the final SAE in ``sae/`` and ``COMPLETE`` last. A
restart with the same workdir continues from the newest good checkpoint and gives bit-identical
parameters to a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
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

from sae_jax import __version__, evals, sharding, store
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import ConfigError, DataError, Preempted
from sae_jax.saes.sae import SAE
from sae_jax.train.checkpoint import Checkpointer, abstract_state
from sae_jax.train.data import BatchStream
from sae_jax.train.state import _init_state, init_train_state
from sae_jax.train.step import METRIC_NAMES, make_train_step
from sae_jax.train.tensorboard import EventWriter


def iterate_batches(activations, batch_size: int, d_in: int, seed: int,
                    total_tokens: int | None):
  """[batch_size, d_in] float32 batches, as train_sae would read them (no hold-out)."""
  return iter(BatchStream(activations, batch_size, d_in, seed, total_tokens))


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
  for p in (run.state, run.sae, run.tensorboard):
    shutil.rmtree(p, ignore_errors=True)
  for p in (run.metrics, run.eval, run.complete_marker, run.config):
    p.unlink(missing_ok=True)


def train_sae(activations: np.ndarray | Iterable[np.ndarray], sae_config: SAEConfig,
              train_config: TrainConfig, workdir: str | Path | None = None,
              mesh: Mesh | None = None, *, eval_activations: np.ndarray | None = None,
              overwrite: bool = False, metadata: dict | None = None,
              on_complete: Callable[[SAE, store.RunDir], None] | None = None,
              log_fn: Callable[[str], None] = logging.info) -> SAE:
  """Train an SAE on activations [n, d_in] (an array, or any iterable of such batches).

  Args:
    activations: an in-memory array (shuffled, repeated up to total_tokens) or an iterable of
      [n_i, d_in] arrays (re-batched, shuffled within a buffer). Resuming an iterable re-reads
      it from the start, so pass a re-iterable one (a list, not a generator).
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
  tcfg = train_config
  run = store.RunDir(workdir) if workdir is not None else None
  if run is not None:
    _check_same_run(run, _run_config(sae_config, tcfg), overwrite)
    if run.is_complete():
      log_fn(f"{run.path} is complete; loading its SAE")
      from sae_jax.formats import load_sae
      return load_sae(run.sae)
    run.ensure()
    store.atomic_write_json(run.config, _run_config(sae_config, tcfg))
  mesh = mesh or sharding.make_mesh()
  stream = BatchStream(activations, tcfg.batch_size, sae_config.d_in, tcfg.seed,
                       tcfg.total_tokens, tcfg.shuffle_batches,
                       0 if eval_activations is not None else tcfg.eval_tokens)
  step = make_train_step(sae_config, tcfg, mesh)
  ckpt = Checkpointer(run.state, tcfg.keep_checkpoints) if run is not None else None
  state, resume_step = None, None
  if ckpt is not None and ckpt.steps():
    t0 = time.perf_counter()
    shapes = jax.eval_shape(lambda: _init_state(sae_config, tcfg, None, jax.random.key(0)))
    restored = ckpt.restore_latest(abstract_state(step.state_shardings, shapes))
    if restored is not None:
      state, position = restored
      stream.restore(position)
      resume_step = stream.served
      log_fn(f"resumed {run.path} at batch {stream.served} (step {int(state.step)}) in "
             f"{time.perf_counter() - t0:.1f}s")
  batches = iter(stream)
  if state is None:
    try:
      first = next(batches)
    except StopIteration:
      raise DataError(f"no full batch of {tcfg.batch_size} tokens in the activations") from None
    state = init_train_state(sae_config, tcfg, mesh, first)
    batches = _prepend(first, batches)
  eval_rows = eval_activations if eval_activations is not None else stream.eval_rows
  total = stream.total_batches
  log_fn(f"training {sae_config.architecture} SAE d_in={sae_config.d_in} "
         f"d_sae={sae_config.d_sae} k={sae_config.k} on {mesh.devices.size} device(s), "
         f"{tcfg.batch_size} tokens/step" + (f", {total} steps" if total else ""))
  log = _RunLog(run, resume_step)
  metrics, t0, start = None, time.perf_counter(), stream.served
  last = {}
  try:
    with _SigtermFlag() as sigterm:
      for batch in batches:
        state, metrics = step(state, jax.device_put(batch, step.x_sharding))
        served = stream.served
        if served % tcfg.log_every == 0 or served == total:
          last = {k: float(v) for k, v in metrics.items()}
          _check_nan_budget(state, tcfg)
          log.write(served, "train", last)
          log_fn(_progress_line(served, total, start, tcfg.batch_size,
                                time.perf_counter() - t0, last))
        if eval_rows is not None and tcfg.eval_every and served % tcfg.eval_every == 0:
          log.write(served, "eval", _evaluate(sae_config, state, eval_rows))
        if ckpt is not None and (served % tcfg.checkpoint_every == 0 or sigterm.raised):
          ckpt.save(served, state, stream.position())
          log.flush()
          if served % tcfg.log_every == 0:
            log.write(served, "checkpoint", {"save_blocking_s": ckpt.last_save_blocking_s})
        if sigterm.raised:
          ckpt_note = "checkpointed" if ckpt is not None else "no workdir, nothing saved"
          if ckpt is not None:
            ckpt.wait()
          note = (f"SIGTERM at batch {served}: {ckpt_note}; rerun with the same workdir "
                  "to resume")
          logging.warning(note)
          raise Preempted(note)
    if metrics is not None:
      last = {k: float(v) for k, v in metrics.items()}
    _check_nan_budget(state, tcfg)
    if ckpt is not None and stream.served not in ckpt.steps():
      ckpt.save(stream.served, state, stream.position())  # a kill below resumes here
    if ckpt is not None:
      ckpt.wait()
    meta = {**(metadata or {}), "tokens_seen": int(state.step) * tcfg.batch_size,
            "steps": int(state.step), "nan_batches": int(state.nan_batches),
            "final_metrics": last, "train_config": tcfg.to_dict(), "sae_jax_version": __version__}
    sae = SAE(sae_config, jax.device_get(state.params), jax.device_get(state.buffers), meta)
    if eval_rows is not None:
      final_eval = evals.reconstruction_metrics(sae, eval_rows)
      sae.metadata["eval"] = final_eval
      log.write(stream.served, "eval", final_eval)
    if run is not None:
      sae.save(run.sae)
      store.atomic_write_json(run.eval, sae.metadata.get("eval", {}))
      log.close()
      if on_complete is not None:
        on_complete(sae, run)
      run.mark_complete({"steps": int(state.step), "tokens_seen": meta["tokens_seen"]})
    return sae
  finally:
    log.close()
    if ckpt is not None:
      with contextlib.suppress(Exception):
        ckpt.close()


def _prepend(first, rest):
  yield first
  yield from rest


def _evaluate(sae_config: SAEConfig, state, rows) -> dict:
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
