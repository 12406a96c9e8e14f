"""The activation producer: token batches -> truncated forward -> mixed [n, D] token rows.

Per token it carries the token id, document id, position and language. BOS, padding and the
tokenizer's other special tokens are dropped. Tokens are mixed across documents in rounds of
``buffer_batches`` forward batches (a buffer refilled when empty, permuted with (seed, round)):
a position in the stream is then (round, offset), and a resumed run recomputes only the round
it stopped in. (Refilling at half-empty mixes a little better but makes a token's place depend on
the whole history, so exact resume would need the buffer in every checkpoint.)

Each host runs the model on its own batches (the data-parallel slice of TokenBatches); the
next batch is staged on the device by a background thread while the current one runs.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple

import jax
import numpy as np

from sae_jax.data.tokens import TokenBatch, TokenBatches
from sae_jax.models.base import Model


class ActivationRows(NamedTuple):
  """Token rows: acts {hook: [n, D] float32} and per-row metadata [n]."""

  acts: dict[str, np.ndarray]
  token: np.ndarray
  doc: np.ndarray
  pos: np.ndarray
  language: np.ndarray


def keep_mask(batch: TokenBatch, special_ids) -> np.ndarray:
  """[B, T] bool: real tokens that are not special (BOS, pad, unk, ...)."""
  keep = batch.mask.astype(bool)
  if len(special_ids):
    keep &= ~np.isin(batch.ids, np.asarray(list(special_ids)))
  return keep


def batch_rows(model: Model, batch: TokenBatch, hooks, special_ids, device_batch=None
               ) -> ActivationRows:
  """One forward batch -> its kept token rows (in batch order)."""
  ids = batch.ids if device_batch is None else device_batch[0]
  mask = batch.mask if device_batch is None else device_batch[1]
  acts = model.activations(ids, list(hooks), attention_mask=mask)
  keep = keep_mask(batch, special_ids)
  flat = keep.reshape(-1)
  out = {h: np.asarray(a).reshape(-1, a.shape[-1])[flat] for h, a in acts.items()}
  return ActivationRows(out, batch.ids.reshape(-1)[flat], batch.doc.reshape(-1)[flat],
                        batch.pos.reshape(-1)[flat], batch.language.reshape(-1)[flat])


def concat_rows(parts: list[ActivationRows]) -> ActivationRows:
  return ActivationRows({h: np.concatenate([p.acts[h] for p in parts]) for h in parts[0].acts},
                        *(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("token", "doc", "pos", "language")))


def take_rows(rows: ActivationRows, idx) -> ActivationRows:
  return ActivationRows({h: a[idx] for h, a in rows.acts.items()}, rows.token[idx],
                        rows.doc[idx], rows.pos[idx], rows.language[idx])


def prefetch(items, put=jax.device_put, size: int = 2):
  """Iterate TokenBatch ``items`` as (item, (put(ids), put(mask))), the next ones prepared by a
  background thread (``put``: device_put, or a global array from this host's share)."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def work():
    try:
      for item in items:
        q.put((item, (put(item.ids), put(item.mask))))
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
      return
    q.put(sentinel)

  threading.Thread(target=work, daemon=True).start()
  while True:
    got = q.get()
    if got is sentinel:
      return
    if isinstance(got, BaseException):
      raise got
    yield got


class ActivationStream:
  """Mixed activation rows for one or more hooks, as a re-startable iterable.

  Iterating yields :class:`ActivationRows` chunks (one per round). ``rows_from(n)`` starts at
  row ``n`` of the mixed stream, recomputing only the round that contains it; ``train_sae``
  uses it to resume exactly.
  """

  def __init__(self, model: Model, batches: TokenBatches, hooks, buffer_batches: int,
               seed: int, special_ids=None):
    self.model, self.batches, self.hooks = model, batches, tuple(hooks)
    self.buffer_batches, self.seed = buffer_batches, seed
    if special_ids is None:
      special_ids = model.tokenizer.all_special_ids
    self.special_ids = frozenset(special_ids)
    self.n_rounds = -(-len(batches) // buffer_batches)
    self._round_sizes: dict[int, int] = {}

  @property
  def d_model(self) -> int:
    return self.model.cfg.d_model

  def round_rows(self, r: int) -> ActivationRows:
    """All kept rows of round r, mixed (a pure function of r)."""
    lo, hi = r * self.buffer_batches, min((r + 1) * self.buffer_batches, len(self.batches))
    parts = [batch_rows(self.model, b, self.hooks, self.special_ids, dev)
             for b, dev in prefetch(self.batches[i] for i in range(lo, hi))]
    rows = concat_rows(parts)
    perm = np.random.default_rng([self.seed, r]).permutation(len(rows.token))
    return take_rows(rows, perm)

  def __iter__(self) -> Iterator[ActivationRows]:
    return self.rows_from(0)

  def rows_from(self, start: int) -> Iterator[ActivationRows]:
    """Chunks of the mixed stream from row ``start`` on (earlier rounds are only counted)."""
    seen = 0
    for r in range(self.n_rounds):
      if seen < start and seen + self.round_size(r) <= start:
        seen += self.round_size(r)
        continue
      rows = self.round_rows(r)
      skip = max(start - seen, 0)
      if len(rows.token) > skip:
        yield take_rows(rows, slice(skip, None))
      seen += len(rows.token)

  def round_size(self, r: int) -> int:
    """Kept rows in round r, counted without running the model (they depend on tokens only)."""
    if r not in self._round_sizes:
      lo, hi = r * self.buffer_batches, min((r + 1) * self.buffer_batches, len(self.batches))
      self._round_sizes[r] = sum(int(keep_mask(self.batches[i], self.special_ids).sum())
                                 for i in range(lo, hi))
    return self._round_sizes[r]


class MultiHookRows:
  """An ActivationStream seen as {hook: [n, D]} chunks: one forward feeds an SAE per hook
  (``sj.train_saes`` with ``SAEJob(hook=...)``)."""

  def __init__(self, stream: ActivationStream):
    self.stream = stream

  def __iter__(self):
    return (c.acts for c in self.stream)

  def rows_from(self, start: int):
    return (c.acts for c in self.stream.rows_from(start))


class HookRows:
  """An ActivationStream seen as [n, D] arrays of one hook: what ``train_sae`` consumes."""

  def __init__(self, stream: ActivationStream, hook: str):
    self.stream, self.hook = stream, hook

  def __iter__(self):
    return (c.acts[self.hook] for c in self.stream)

  def rows_from(self, start: int):
    return (c.acts[self.hook] for c in self.stream.rows_from(start))
