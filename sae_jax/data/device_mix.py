"""The on-device mixing buffer: sharded forward -> kept, mixed token rows -> SAE batches, with
the activations never leaving the devices.

A *round* is ``buffer_batches`` global forward batches (global batches ``r * bb`` up to
``(r + 1) * bb - 1``, whatever the process count: at each forward step every process feeds its
own batch, and the step's global [P * B, T] array holds them in process order). From the token
ids alone (host data, every host computes the same) the host decides which rows of a round are
kept (real tokens that are not BOS, padding or another special token) and in which order: the
kept rows permuted by ``np.random.default_rng([seed, r])``, the very permutation of the host
mixer (:class:`sae_jax.data.activations.ActivationStream`), so both paths give the same rows in
the same order. From that order it also works out where every row goes (:mod:`sae_jax.data.
exchange`): which "data" shard holds it after the forward, which shard serves it in which
batch; two small int32 arrays per round are sent to the devices with ``device_put`` next to the
token batches; nothing comes back. This host work of round r + 1 (token batches, keep masks,
order, moves, puts) runs in a background thread while the devices run round r: one round deep,
and each round a pure function of r (and of the rows carried into it), so the rows are the same
with or without it.

On the devices each shard sends each round row once, straight to the shard that serves it (one
all-to-all), into a pool laid out batch by batch, behind the rows carried over from the
previous round (the last rows that did not fill a batch, already where they are served);
batches are ``size``-row slices of every shard's pool, sharded on "data", read with no
communication. Every shape is static (the exchange's per-pair width is rounded up to a few
sizes), so the programs compile a handful of times per batch size. The stream is global: every
process sees the same batches, so a run resumes with any process count and a P-process run
equals a one-process run.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sae_jax import distributed, sharding
from sae_jax.data import exchange
from sae_jax.data.activations import (ActivationRows, ActivationStream, HookRows, MultiHookRows,
                                      keep_mask)
from sae_jax.data.position import ServedPosition
from sae_jax.data.tokens import TokenBatch
from sae_jax.errors import ConfigError, DataError


class RoundPlan(NamedTuple):
  """Which rows of a round's [capacity] buffer the stream reads, in order."""

  index: np.ndarray  # [capacity] int32 buffer rows, kept and mixed, then zero padding
  n: int  # kept rows (the valid prefix of ``index``)


class HostRound(NamedTuple):
  """Round r's host data, a pure function of r: its global token batches and its plan."""

  r: int
  batches: dict[int, TokenBatch]  # global batch index -> [B, T] batch, every process's
  plan: RoundPlan


class StagedRound(NamedTuple):
  """A round ready for the devices: its host data, this host's forward steps' (ids, mask)
  [P * B, T] global arrays, and the moves that put its rows where they are served (host
  arrays, and ``send`` / ``gather`` already put)."""

  host: HostRound
  steps: list[tuple[jax.Array, jax.Array]]
  moves: exchange.Exchange
  send: jax.Array
  gather: jax.Array


class DeviceStream:
  """Mixed activation rows of one or more hooks, kept on ``mesh``.

  Args:
    stream: the host mixer's stream (model, this host's TokenBatches, hooks, buffer_batches,
      seed, special tokens): the device stream reads the same rows in the same order.
    mesh: the mesh the rows live on (the SAEs'; the model's own when it was loaded onto one).
  """

  def __init__(self, stream: ActivationStream, mesh: Mesh):
    self.model, self.batches, self.hooks = stream.model, stream.batches, stream.hooks
    self.seed, self.special_ids, self.mesh = stream.seed, stream.special_ids, mesh
    procs, bb = self.batches.process_count, stream.buffer_batches
    if bb % procs:
      raise ConfigError(f"buffer_batches={bb} must be a multiple of the process count {procs} "
                        "(a round is whole forward steps of every process)")
    self.buffer_batches, self.steps_per_round = bb, bb // procs
    self.n_steps = len(self.batches)  # forward steps: one batch of every process each
    self.n_rounds = -(-self.n_steps // self.steps_per_round)
    b, t = self.batches.cfg.batch_size, self.batches.cfg.ctx_len
    self.capacity = bb * b * t
    self.step_shape = (procs * b, t)  # one forward step's global [P * B, T] token batch
    self.ids_sharding = sharding.sharding_for_shape(mesh, ("batch", "length"), self.step_shape)
    self.on_mesh = getattr(self.model, "mesh", None) is not None
    if procs > 1 and not self.on_mesh:
      raise ConfigError("on several processes the model must be loaded onto the mesh "
                        "(sj.load_model(..., mesh=mesh)) for the on-device data path")
    # Block 0 of a round's pool, on the devices once (a take returns the next slot).
    self._slot0 = sharding.place(np.asarray(0, np.int32), mesh)
    self._sizes: dict[int, int] = {}
    self._compiled: dict[exchange.Layout, tuple] = {}  # (zeros, take) per layout
    self._mixes: dict[tuple[exchange.Layout, int], object] = {}  # per layout and pair width
    # The last round's host data, built once on the main thread: round_size, plan and
    # round_meta all read it (building a batch is a Python loop over its rows).
    self._last: HostRound | None = None

  @property
  def d_model(self) -> int:
    return self.model.cfg.d_model

  def _globals(self, r: int) -> range:
    """The global batches of round r."""
    top = self.n_steps * self.batches.process_count
    return range(r * self.buffer_batches, min((r + 1) * self.buffer_batches, top))

  def host_round(self, r: int) -> HostRound:
    """Round r's token batches (every process's) and its kept rows in mixed order. A pure
    function of r that reads the stream's state and never writes it: the prefetching thread
    calls it for the next round while the devices run this one."""
    batches = {g: self.batches.global_batch(g) for g in self._globals(r)}
    keep = np.concatenate([keep_mask(b, self.special_ids).reshape(-1) for b in batches.values()])
    kept = np.flatnonzero(keep).astype(np.int32)
    perm = np.random.default_rng([self.seed, r]).permutation(len(kept))
    index = np.zeros(self.capacity, np.int32)
    index[:len(kept)] = kept[perm]
    return HostRound(r, batches, RoundPlan(index, len(kept)))

  def _cached(self, r: int) -> HostRound:
    if self._last is None or self._last.r != r:
      self._last = self.host_round(r)
      self._sizes[r] = self._last.plan.n
    return self._last

  def plan(self, r: int) -> RoundPlan:
    """Round r's kept rows in mixed order (host data: the token ids of every process)."""
    return self._cached(r).plan

  def round_size(self, r: int) -> int:
    """Kept rows in round r (from the token ids; no forward)."""
    if r not in self._sizes:
      self._cached(r)
    return self._sizes[r]

  def round_meta(self, r: int) -> ActivationRows:
    """Round r's per-row metadata (token, doc, pos, language) in the stream's order: host
    arrays permuted with the same index (``acts`` is empty: those rows stay on the devices)."""
    host = self._cached(r)
    parts, plan = list(host.batches.values()), host.plan
    take = lambda f: np.concatenate([getattr(p, f).reshape(-1) for p in parts])[
        plan.index[:plan.n]]
    return ActivationRows({}, *(take(f) for f in ("ids", "doc", "pos", "language")))

  def layout(self, size: int) -> exchange.Layout:
    """The exchange's static shapes for blocks of ``size`` rows."""
    n = self.mesh.shape["data"]
    if size % n:
      raise ConfigError(f"blocks of {size} rows do not split over the mesh's 'data' axis of "
                        f"size {n}")
    return exchange.stream_layout(n, size, *self.step_shape, self.steps_per_round)

  def stage(self, host: HostRound, lay: exchange.Layout, have: int = 0,
            skip: int = 0) -> StagedRound:
    """Round ``host.r`` put on the devices: this host's token batches of its forward steps
    (a global array from every process's share) and the moves that serve its kept rows from
    the ``skip``-th on, behind ``have`` carried rows (explicit puts)."""
    put = ((lambda a: distributed.to_global(a, self.ids_sharding)) if self.on_mesh
           else jax.device_put)  # a model on one device: its inputs on that device
    lo = host.r * self.steps_per_round
    hi = min(lo + self.steps_per_round, self.n_steps)
    procs, me = self.batches.process_count, self.batches.process_index
    local = [host.batches[i * procs + me] for i in range(lo, hi)]  # this host's
    moves = exchange.plan(host.plan.index[skip:host.plan.n], have, lay)
    return StagedRound(host, [(put(b.ids), put(b.mask)) for b in local], moves,
                       *exchange.put(moves, self.mesh))

  def staged_rounds(self, first: int, size: int, skip: int = 0) -> Iterator[StagedRound]:
    """Rounds ``first``, ``first + 1``, ... staged for blocks of ``size`` rows (the first
    round from its ``skip``-th kept row), the next one built and put by a background thread
    while the caller runs this one (one deep; the same rounds as without it: each is a pure
    function of r and the rows carried into it). The producer's exception is raised here, on
    the caller's thread; the thread ends when the iterator ends, fails or is closed."""
    lay = self.layout(size)
    pool = ThreadPoolExecutor(1, thread_name_prefix="sae_jax-device-mix")
    try:
      pending = pool.submit(self.stage, self._cached(first), lay, 0, skip)
      for r in range(first, self.n_rounds):
        staged = pending.result()  # the producer's exception, re-raised as it was
        if r + 1 < self.n_rounds:
          pending = pool.submit(lambda r, have: self.stage(self.host_round(r), lay, have),
                                r + 1, staged.moves.left)
        self._sizes[r] = staged.host.plan.n
        yield staged
    finally:
      pool.shutdown(wait=True, cancel_futures=True)  # at most the one round in flight

  def _forward(self, staged: StagedRound) -> list[dict[str, jax.Array]]:
    """A round's forward steps: {hook: [P * B, T, D]} each, padded to a whole round."""
    if not self.on_mesh:  # a model on one device: its outputs moved to the mesh (explicit)
      acts_sharding = sharding.sharding_for_shape(self.mesh, ("batch", "length", "embed"),
                                                  self.step_shape + (self.d_model,))
    out = []
    for ids, mask in staged.steps:
      acts = self.model.activations(ids, list(self.hooks), attention_mask=mask)
      if self.on_mesh and self.mesh.shape["model"] > 1:
        sharding.settle(acts, self.mesh)  # a tensor-parallel forward has collectives
      out.append(acts if self.on_mesh else jax.device_put(acts, acts_sharding))
    return out + [out[-1]] * (self.steps_per_round - len(out))  # never indexed

  def _programs(self, lay: exchange.Layout):
    """(zeros, take) for blocks of ``lay``: each compiles once."""
    if lay not in self._compiled:
      block = sharding.sharding_for_shape(self.mesh, ("batch", "embed"),
                                          (lay.size, self.d_model))
      zeros = jax.jit(lambda: {h: jnp.zeros((lay.size, self.d_model), jnp.float32)
                               for h in self.hooks}, out_shardings={h: block for h in self.hooks})
      self._compiled[lay] = zeros, exchange.take_program(self.mesh, lay)
    return self._compiled[lay]

  def _mix(self, lay: exchange.Layout, m: int):
    """The exchange for ``lay`` and ``m`` rows per pair (a few widths per stream)."""
    if (lay, m) not in self._mixes:
      self._mixes[lay, m] = exchange.mix_program(self.mesh, lay, m)
    return self._mixes[lay, m]

  def _first_round(self, start: int) -> tuple[int, int]:
    """(the round holding row ``start``, the rows before it), counted from the token ids."""
    seen = 0
    for r in range(self.n_rounds):
      n = self.round_size(r)
      if seen + n > start:
        return r, seen
      seen += n
    return self.n_rounds, seen

  def blocks(self, start: int, size: int) -> Iterator[dict[str, jax.Array]]:
    """Consecutive {hook: [size, D]} blocks of the mixed stream from row ``start`` on (the
    rounds before the one holding it are only counted). ``size`` must split over "data"."""
    first, seen = self._first_round(start)
    if first == self.n_rounds:
      return
    lay = self.layout(size)
    zeros, take = self._programs(lay)
    rounds = self.staged_rounds(first, size, start - seen)
    with contextlib.closing(rounds):
      carry = zeros()  # block 0's first rows of the next round: the unfinished block
      for staged in rounds:
        mix = self._mix(lay, staged.moves.m)
        pool = sharding.settle(mix(carry, self._forward(staged), staged.send, staged.gather),
                               self.mesh)
        at = self._slot0
        for _ in range(staged.moves.full):
          got, at = sharding.settle(take(pool, at), self.mesh)
          yield got
        carry, _ = sharding.settle(take(pool, at), self.mesh)


class DeviceBatches(ServedPosition):
  """The trainer's stream over a :class:`DeviceStream`: [batch_size, D] device batches ({hook:
  rows}, or one hook's rows when ``hook`` is set), sharded on "data", with the position
  interface of :class:`sae_jax.train.data.BatchStream` (``served`` batches).

  The first ``holdout`` rows are kept out of training as ``eval_rows``; they are copied to the
  host once (numpy, every process alike) for the reconstruction metrics.
  """

  is_global = True  # a global stream: any process count resumes it

  def __init__(self, stream: DeviceStream, batch_size: int, total_tokens: int | None,
               holdout: int = 0, hook: str | None = None):
    sharding.check_divisible(batch_size, stream.mesh, "data", "batch_size")
    self.stream, self.batch_size, self.total_tokens = stream, batch_size, total_tokens
    self.holdout, self.hook = holdout, hook
    self.served, self.eval_rows = 0, None
    self.process_count = stream.batches.process_count

  @property
  def total_batches(self) -> int | None:
    return None if self.total_tokens is None else self.total_tokens // self.batch_size

  def _pick(self, block: dict):
    return block if self.hook is None else block[self.hook]

  def __iter__(self) -> Iterator:
    if self.holdout and self.eval_rows is None:
      n = self.stream.mesh.shape["data"]
      padded = -(-self.holdout // n) * n  # a block splits over "data"; the rest is unused
      with contextlib.closing(self.stream.blocks(0, padded)) as held_blocks:
        held = next(held_blocks, None)  # closed now: no round is prepared for nothing
      if held is None:
        raise DataError(f"eval_tokens={self.holdout} is more than the stream's rows")
      self.eval_rows = jax.tree.map(lambda a: a[:self.holdout],
                                    self._pick(distributed.to_host(held)))
    total, b = self.total_batches, self.batch_size
    with contextlib.closing(self.stream.blocks(self.holdout + self.served * b, b)) as blocks:
      for index, block in enumerate(blocks, start=self.served):
        if total is not None and index >= total:
          return
        self.served = index + 1
        yield self._pick(block)


def device_batches(source, mesh: Mesh, batch_size: int, total_tokens: int | None,
                   holdout: int, d_in: int | None = None) -> DeviceBatches | None:
  """The on-device path for a producer's rows (``sj.data.hook_rows`` / ``multi_hook_rows``);
  None for any other source (arrays, caches, iterables: the host's BatchStream reads those).
  ``d_in``: the SAEs' width, checked against the model's."""
  stream = getattr(source, "stream", None)
  if d_in is not None and isinstance(stream, ActivationStream) and stream.d_model != d_in:
    raise DataError(f"activations have width {stream.d_model} but the SAE has d_in={d_in}")
  if isinstance(source, HookRows):
    return DeviceBatches(DeviceStream(source.stream, mesh), batch_size, total_tokens, holdout,
                         source.hook)
  if isinstance(source, MultiHookRows):
    return DeviceBatches(DeviceStream(source.stream, mesh), batch_size, total_tokens, holdout)
  return None
