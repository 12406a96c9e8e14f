"""The mixing buffer's row exchange: a round's rows sent straight to the "data" shard that will
serve them, in one all-to-all, and batches read without communication.

The rows a forward step leaves on the devices are split over "data" by token batch; the mixed
stream wants them in another order, cut into ``size``-row batches that are themselves split over
"data". A global gather (``jnp.take`` of the round by a global index) compiles to all-to-alls
through a temp buffer of the whole round on every device (about 2 GB a chip per round at the
paper's setting on a v5e-16), and a dynamic slice of a pool sharded in row order gathers the
whole pool for every batch. Here the host, which already knows the round's order, works out for
every row which shard holds it, which shard serves it and where:

- the *pool* is laid out block-major per shard: shard d's local rows are, for block 0, 1, ...,
  the block's rows ``d * size / n`` up to ``(d + 1) * size / n - 1``; so block b is the local
  slice ``[b * size / n, (b + 1) * size / n)`` of every shard, read with no collective;
- ``send[e]`` lists, per destination shard, the (padded) local rows shard e sends it: one
  ``all_to_all`` of [n, M, D] (M: the largest (source, destination) count, rounded up);
- ``gather[d]`` places each received row in shard d's pool; ``-1`` marks the rows carried over
  from the last round (they are the first rows of block 0, already on the shard that serves
  them: the unfinished block of the last round).

Only the host computes indices; the devices move each row at most once. On one shard (or when
the forward's rows are replicated, a batch "data" does not split) no exchange is needed and the
gather is local.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sae_jax import sharding


class Layout(NamedTuple):
  """Static shapes of a stream's exchange (one compile per layout and ``m``)."""

  shards: int  # n: the mesh's "data" size
  size: int  # rows per block (a multiple of n)
  slots: int  # blocks the pool holds: every full block of a round plus the unfinished one
  step_rows: int  # rows of one forward step's global [P * B, T] batch
  ctx: int  # T: rows per token sequence
  sharded: bool  # the forward's rows are split over "data" (else replicated)

  @property
  def per(self) -> int:
    """Rows of one block on one shard."""
    return self.size // self.shards


class Exchange(NamedTuple):
  """One round's moves (host arrays; see the module docstring)."""

  send: np.ndarray  # [n, n * m] int32 local source rows per destination (sharded only)
  gather: np.ndarray  # [n, slots * per] int32 received (or local) row per pool row; -1 carried
  m: int  # rows per (source, destination) pair in the all-to-all (1 when not sharded)
  full: int  # full blocks in the pool this round
  left: int  # rows of the unfinished block ``full``, carried to the next round


def layout(shards: int, size: int, capacity: int, step_rows: int, ctx: int,
           sharded: bool) -> Layout:
  """The pool holds at most ``size - 1`` carried rows plus a round's ``capacity``."""
  return Layout(shards, size, (size - 1 + capacity) // size + 1, step_rows, ctx, sharded)


def stream_layout(shards: int, size: int, step_batch: int, ctx: int,
                  steps_per_round: int) -> Layout:
  """The layout of a stream whose rounds are ``steps_per_round`` forwards of [step_batch, ctx]
  token batches (every process's), served in blocks of ``size`` rows."""
  return layout(shards, size, steps_per_round * step_batch * ctx, step_batch * ctx, ctx,
                step_batch % shards == 0)


def expected_width(lay: Layout, rows: int) -> int:
  """The all-to-all's per-pair width for ``rows`` round rows spread uniformly (the planner's
  estimate: the mean pair count plus four standard deviations, bucketed as :func:`plan` does)."""
  mean = rows / lay.shards ** 2
  return _bucket(int(np.ceil(mean + 4 * np.sqrt(mean))), mean)


def _bucket(count: int, mean: float) -> int:
  """Round the largest pair count up to a multiple of a quarter of the mean pair count, so
  rounds share a handful of compiled shapes."""
  step = max(8, int(np.ceil(mean / 4)))
  return max(step, -(-count // step) * step)


def _sources(order: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
  """([R] shard, [R] local row) holding each global round row of ``order``."""
  if not lay.sharded:
    return np.zeros_like(order), order
  step, rem = np.divmod(order, lay.step_rows)
  seq, pos = np.divmod(rem, lay.ctx)
  per_shard = lay.step_rows // lay.ctx // lay.shards  # sequences of a step on one shard
  shard, seq_local = np.divmod(seq, per_shard)
  return shard, (step * per_shard + seq_local) * lay.ctx + pos


def plan(order: np.ndarray, have: int, lay: Layout) -> Exchange:
  """The moves that put ``have`` carried rows and then the round's rows ``order`` ([R] global
  row ids in the forward's order, already mixed) into the pool.

  Returns an :class:`Exchange`; ``full`` blocks are complete and ``left`` rows start block
  ``full`` (the next round's carried rows)."""
  n, per = lay.shards, lay.per
  total = have + len(order)
  if total > lay.slots * lay.size:
    raise ValueError(f"{total} rows do not fit a pool of {lay.slots} blocks of {lay.size}")
  block, within = np.divmod(np.arange(have, total), lay.size)
  dst, offset = np.divmod(within, per)
  slot = block * per + offset  # local pool row on shard dst
  src, local = _sources(np.asarray(order, np.int64), lay)
  gather = np.zeros((n, lay.slots * per), np.int32)
  if lay.sharded and n > 1:
    pair = src * n + dst
    counts = np.bincount(pair, minlength=n * n)
    m = _bucket(int(counts.max(initial=0)), len(order) / (n * n))
    by_pair = np.argsort(pair, kind="stable")  # within a pair: the stream's order
    rank = np.empty_like(by_pair)
    rank[by_pair] = np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts, counts)
    send = np.zeros((n, n * m), np.int32)
    send[src, dst * m + rank] = local
    gather[dst, slot] = src * m + rank
  else:
    m, send = 1, np.zeros((n, n), np.int32)
    gather[dst, slot] = local
  carried = np.arange(n)[:, None] * per + np.arange(per)[None, :] < have  # block 0's first rows
  gather[:, :per][carried] = -1
  return Exchange(send, gather, m, total // lay.size, total % lay.size)


def _local_mix(carry, steps, send, gather, *, lay: Layout, m: int):
  """One shard: its forward rows -> (exchange) -> its pool rows, per hook."""
  out = {}
  for h, c in carry.items():
    # Rows cross the mesh in the forward's dtype (bfloat16 at the paper's setting: half the
    # bytes) and become float32 in the pool, where the SAE reads them.
    rows = jnp.concatenate([s[h].reshape(-1, s[h].shape[-1]) for s in steps])
    if lay.sharded and lay.shards > 1:
      sent = jnp.take(rows, send[0], axis=0).reshape(lay.shards, m, -1)
      rows = lax.all_to_all(sent, "data", 0, 0, tiled=True).reshape(lay.shards * m, -1)
    g = gather[0]
    pool = jnp.take(rows, jnp.maximum(g, 0), axis=0).astype(jnp.float32)
    head = jnp.where((g[:lay.per] < 0)[:, None], c, pool[:lay.per])
    out[h] = pool.at[:lay.per].set(head)
  return out


def mix_program(mesh: Mesh, lay: Layout, m: int):
  """jit((carry {h: [size, D]}, steps [{h: [P * B, T, D]}], send, gather) -> pool {h: [n *
  slots * per, D]}), every array sharded on "data" (rows replicated over "model")."""
  rows_spec = P("data") if lay.sharded else P()
  body = lambda c, s, snd, g: _local_mix(c, s, snd, g, lay=lay, m=m)
  return jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(P("data"), rows_spec, P("data"), P("data")),
                               out_specs=P("data")))


def take_program(mesh: Mesh, lay: Layout):
  """jit((pool, slot) -> ({h: [size, D]} block ``slot``, slot + 1)): a local slice per shard."""
  def body(pool, slot):
    return ({h: lax.dynamic_slice_in_dim(a, slot * lay.per, lay.per) for h, a in pool.items()},
            slot + 1)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()),
                               out_specs=(P("data"), P())))


def put(ex: Exchange, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """The round's (send, gather) on the devices, each shard its own row (explicit puts; every
  process computed the same host arrays)."""
  return sharding.place(ex.send, mesh, ("batch",)), sharding.place(ex.gather, mesh, ("batch",))
