"""Activations in, fixed-size training batches out, with a position that checkpoints exactly.

The stream is stateless given its position: an in-memory array is read in a permutation
derived from (seed, epoch); a source with ``rows_from(n)`` (the activation producer) restarts at
the row it stopped at; any other iterable is re-read from the start and the batches already
served are skipped.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from sae_jax.data.position import ServedPosition
from sae_jax.errors import ConfigError, DataError
from sae_jax.train.state import check_batch


class BatchStream(ServedPosition):
  """[batch_size, d_in] float32 batches from an array or an iterable of [n_i, d_in] arrays.

  Args:
    activations: an array (shuffled each epoch, repeated up to ``total_tokens``; one epoch when
      None) or an iterable of arrays (shuffled within buffers of ``shuffle_batches`` batches,
      read once). The last ``holdout`` rows of an array, or the first ``holdout`` rows of an
      iterable, are kept out of training as ``eval_rows``.
    process_index, process_count: this host among the processes of a multi-host run. Batches
      are then this host's share, [batch_size / process_count, d_in]: of a *global* source
      (an array, or one with ``global_rows = True`` such as a cache reader, which every host
      reads alike) the host's slice of the same global batch, so the run equals a one-process
      run; of a per-host source (the streamed extraction of this host's token shard, or any
      plain iterable) the host's own next rows.
    all_have: for a per-host source on several hosts, a collective "does every host have a
      next batch" (hosts' streams may end a batch apart; all must stop at the same one).
  """

  def __init__(self, activations: np.ndarray | Iterable[np.ndarray], batch_size: int, d_in: int,
               seed: int, total_tokens: int | None, shuffle_batches: int = 8, holdout: int = 0,
               process_index: int = 0, process_count: int = 1,
               all_have: Callable[[bool], bool] | None = None):
    self.batch_size, self.d_in, self.seed = batch_size, d_in, seed
    self.total_tokens, self.shuffle_batches = total_tokens, shuffle_batches
    self.served = 0  # batches handed out so far: the position
    self.process_index, self.process_count = process_index, process_count
    self._all_have = all_have
    if batch_size % process_count:
      raise ConfigError(f"batch_size={batch_size} must be a multiple of the process count "
                        f"{process_count} (every host feeds an equal share of a batch)")
    self.eval_rows: np.ndarray | None = None
    self._array = None
    if hasattr(activations, "shape"):
      check_batch(activations, d_in)
      n = activations.shape[0]
      if holdout:
        if holdout >= n:
          raise DataError(f"eval_tokens={holdout} leaves no training rows out of {n}")
        self.eval_rows = np.asarray(activations[n - holdout:], np.float32)
        activations = activations[:n - holdout]
      if activations.shape[0] < batch_size:
        raise DataError(f"{activations.shape[0]} activation rows are fewer than "
                        f"batch_size={batch_size}")
      self._array = activations
    else:
      self._source = activations
      self._holdout = holdout

  @property
  def total_batches(self) -> int | None:
    if self.total_tokens is not None:
      return self.total_tokens // self.batch_size
    if self._array is not None:
      return self._array.shape[0] // self.batch_size
    return None

  def restore(self, position: dict) -> None:
    super().restore(position)
    if self._array is None and self.served and iter(self._source) is self._source:
      raise ConfigError("cannot resume from a one-shot iterator: pass a re-iterable source (a "
                        "list, or an object whose __iter__ starts over) to resume exactly")

  @property
  def is_global(self) -> bool:
    """Whether every host reads the same rows (then each takes its slice of a global batch)."""
    return self._array is not None or bool(getattr(self._source, "global_rows", False))

  def __iter__(self) -> Iterator[np.ndarray]:
    if self.process_count == 1:
      yield from self._batches(self.batch_size)
    elif self.is_global:
      lb, lo = self.batch_size // self.process_count, self.process_index
      for batch in self._batches(self.batch_size):
        yield _map_rows(batch, lambda a: a[lo * lb:(lo + 1) * lb])
    else:
      batches = self._batches(self.batch_size // self.process_count)
      while True:
        batch = next(batches, None)
        if self._all_have is not None and not self._all_have(batch is not None):
          if batch is not None:
            self.served -= 1  # not trained on: a resume starts with it
          return
        if batch is None:
          return
        yield batch

  def _batches(self, b: int) -> Iterator[np.ndarray]:
    """Batches of ``b`` rows from the current position (served counts them)."""
    if self._array is not None:
      gen, first = self._array_batches(), 0
    elif hasattr(self._source, "rows_from"):
      gen, first = self._resumable_batches(self.served, b), self.served
    else:
      gen, first = self._iterable_batches(b), 0
    total = self.total_batches
    for index, batch in enumerate(gen, start=first):
      if total is not None and index >= total:
        return
      if index < self.served:
        continue
      self.served = index + 1
      yield batch

  def _resumable_batches(self, start_batch: int, b: int) -> Iterator[np.ndarray | dict]:
    """In-order batches of a source that can start at any row (it does its own mixing).

    Chunks may be arrays or dicts of equally long arrays (several hooks of one forward); the
    batches then are dicts too.
    """
    hold = self._holdout
    if hold and self.eval_rows is None:
      got, parts = 0, []
      for chunk in self._source.rows_from(0):
        parts.append(_map_rows(chunk, lambda a: np.asarray(a[:hold - got], np.float32)))
        got += _n_rows(parts[-1])
        if got >= hold:
          break
      self.eval_rows = _concat(parts)
    pending, have = [], 0
    for chunk in self._source.rows_from(hold + start_batch * b):
      chunk = _map_rows(chunk, lambda a: np.asarray(a, np.float32))
      _map_rows(chunk, lambda a: check_batch(a, self.d_in))
      pending.append(chunk)
      have += _n_rows(chunk)
      if have >= b:
        rows = _concat(pending)
        full = (have // b) * b
        for i in range(0, full, b):
          yield _map_rows(rows, lambda a: a[i:i + b])
        pending, have = [_map_rows(rows, lambda a: a[full:])], have - full

  def _array_batches(self) -> Iterator[np.ndarray]:
    a, b = self._array, self.batch_size
    per_epoch = a.shape[0] // b
    epoch = 0
    while True:
      perm = np.random.default_rng([self.seed, epoch]).permutation(a.shape[0])
      for i in range(per_epoch):
        yield np.asarray(a[np.sort(perm[i * b:(i + 1) * b])], np.float32)
      epoch += 1

  def _iterable_batches(self, b: int) -> Iterator[np.ndarray]:
    cap = self.shuffle_batches * b
    need_eval = self._holdout
    held: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    have, buffer_no = 0, 0
    for chunk in self._source:
      chunk = np.asarray(chunk, np.float32)
      check_batch(chunk, self.d_in)
      if need_eval:
        take = min(need_eval, chunk.shape[0])
        held.append(chunk[:take])
        chunk, need_eval = chunk[take:], need_eval - take
        if not need_eval:
          self.eval_rows = np.concatenate(held)
      pending.append(chunk)
      have += chunk.shape[0]
      if have >= cap:
        rows = np.concatenate(pending)
        full = (have // b) * b
        yield from self._shuffled(rows[:full], buffer_no, b)
        buffer_no += 1
        pending, have = [rows[full:]], have - full
    if have >= b:
      rows = np.concatenate(pending)
      yield from self._shuffled(rows[:(have // b) * b], buffer_no, b)

  def _shuffled(self, rows: np.ndarray, buffer_no: int, b: int) -> Iterator[np.ndarray]:
    perm = np.random.default_rng([self.seed, 1 << 20, buffer_no]).permutation(rows.shape[0])
    for i in range(rows.shape[0] // b):
      yield rows[perm[i * b:(i + 1) * b]]


def _map_rows(rows, fn):
  return {k: fn(v) for k, v in rows.items()} if isinstance(rows, dict) else fn(rows)


def _n_rows(rows) -> int:
  return len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)


def _concat(parts):
  if isinstance(parts[0], dict):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)
