"""The fit loop: batches in, a trained SAE out, with a progress line and a NaN budget.

Checkpointing, the run store and evaluation plug in here (the trainer issue); this loop already
owns re-batching, the step, logging and the non-finite-batch limit.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sae_jax import sharding
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.errors import DataError
from sae_jax.saes.sae import SAE
from sae_jax.train.state import check_batch, init_train_state
from sae_jax.train.step import METRIC_NAMES, make_train_step


def iterate_batches(activations, batch_size: int, d_in: int, seed: int,
                    total_tokens: int | None) -> Iterator[np.ndarray]:
  """Yield [batch_size, d_in] float32 batches.

  An array is shuffled (a new permutation each epoch) and repeated until ``total_tokens``
  (one epoch when None); an iterable of [n_i, d_in] arrays is re-batched in order, once.
  A trailing partial batch is dropped.
  """
  served = 0
  if hasattr(activations, "shape"):
    check_batch(activations, d_in)
    n = activations.shape[0]
    if n < batch_size:
      raise DataError(f"{n} activation rows are fewer than batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    limit = total_tokens if total_tokens is not None else (n // batch_size) * batch_size
    while served + batch_size <= limit:
      perm = rng.permutation(n)
      for start in range(0, n - batch_size + 1, batch_size):
        if served + batch_size > limit:
          return
        yield np.asarray(activations[np.sort(perm[start:start + batch_size])], np.float32)
        served += batch_size
    return
  pending: list[np.ndarray] = []
  have = 0
  for chunk in activations:
    chunk = np.asarray(chunk, np.float32)
    check_batch(chunk, d_in)
    pending.append(chunk)
    have += chunk.shape[0]
    while have >= batch_size:
      joined = np.concatenate(pending)
      yield joined[:batch_size]
      served += batch_size
      if total_tokens is not None and served + batch_size > total_tokens:
        return
      rest = joined[batch_size:]
      pending, have = ([rest] if len(rest) else []), len(rest)


def train_sae(activations: np.ndarray | Iterable[np.ndarray], sae_config: SAEConfig,
              train_config: TrainConfig, mesh: Mesh | None = None,
              log_fn: Callable[[str], None] = logging.info) -> SAE:
  """Train an SAE on activations [n, d_in] (an array, or any iterable of such batches).

  Args:
    activations: an in-memory array (shuffled, repeated up to total_tokens) or an iterable
      of [n_i, d_in] arrays (re-batched in order).
    sae_config, train_config: what to train and how.
    mesh: a ("data", "model") mesh; default: every device on "data".
    log_fn: where the progress lines go.

  Returns:
    The trained SAE; ``sae.metadata`` holds tokens seen, steps, skipped batches and the last
    metrics.
  """
  mesh = mesh or sharding.make_mesh()
  tcfg = train_config
  batches = iterate_batches(activations, tcfg.batch_size, sae_config.d_in, tcfg.seed,
                            tcfg.total_tokens)
  try:
    first = next(batches)
  except StopIteration:
    raise DataError(f"no full batch of {tcfg.batch_size} tokens in the activations") from None
  state = init_train_state(sae_config, tcfg, mesh, first)
  step = make_train_step(sae_config, tcfg, mesh)
  total_steps = None if tcfg.total_tokens is None else tcfg.total_tokens // tcfg.batch_size
  log_fn(f"training {sae_config.architecture} SAE d_in={sae_config.d_in} "
         f"d_sae={sae_config.d_sae} k={sae_config.k} on {mesh.devices.size} device(s), "
         f"{tcfg.batch_size} tokens/step" + (f", {total_steps} steps" if total_steps else ""))

  def all_batches():
    yield first
    yield from batches

  t0 = time.perf_counter()
  metrics, steps, last = {}, 0, {}
  for batch in all_batches():
    x = jax.device_put(batch, step.x_sharding)
    state, metrics = step(state, x)
    steps += 1
    if steps % tcfg.log_every == 0 or steps == total_steps:
      last = {k: float(v) for k, v in metrics.items()}
      _check_nan_budget(state, tcfg)
      log_fn(_progress_line(steps, total_steps, tcfg.batch_size, time.perf_counter() - t0, last))
  if steps:
    last = {k: float(v) for k, v in metrics.items()}
  _check_nan_budget(state, tcfg)
  meta = {"tokens_seen": int(steps - int(state.nan_batches)) * tcfg.batch_size,
          "steps": int(state.step), "nan_batches": int(state.nan_batches),
          "final_metrics": last, "train_config": tcfg.to_dict()}
  return SAE(sae_config, state.params, state.buffers, meta)


def _check_nan_budget(state, tcfg: TrainConfig) -> None:
  skipped = int(state.nan_batches)
  if skipped > tcfg.max_nan_batches:
    raise DataError(f"{skipped} batches contained NaN/Inf activations, more than "
                    f"max_nan_batches={tcfg.max_nan_batches}; check the activation source")


def _progress_line(steps: int, total: int | None, batch: int, elapsed: float,
                   m: dict[str, float]) -> str:
  rate = steps * batch / max(elapsed, 1e-9)
  where = f"step {steps}" + (f"/{total}" if total else "")
  eta = ""
  if total:
    eta = f" eta {max(total - steps, 0) * batch / max(rate, 1e-9):.0f}s"
  shown = " ".join(f"{k}={m[k]:.4g}" for k in METRIC_NAMES if k in m and k != "skipped")
  return f"{where} {rate:,.0f} tok/s{eta} {shown}"
