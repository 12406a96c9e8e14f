"""The mixing buffer's exchange on forced CPU meshes: the served blocks are the stream's rows in
order (carried rows, mid-round starts), each row crosses the mesh once, and no device holds a
whole round."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sae_jax import sharding
from sae_jax.config import MeshConfig
from sae_jax.data import exchange

T, D, STEPS, SIZE = 12, 8, 3, 64


def _round(rng, batch):
  """One round's forward rows [capacity, D] and its kept rows in mixed order."""
  rows = rng.normal(size=(STEPS * batch * T, D)).astype(np.float32)
  kept = np.flatnonzero(rng.random(len(rows)) < 0.85)  # dropped BOS / padding rows
  return rows, rng.permutation(kept)


def _serve(mesh, lay, rounds, skip):
  """Run the device programs over ``rounds`` ([(rows, order)]), as DeviceStream.blocks does."""
  batch = lay.step_rows // T
  spec = NamedSharding(mesh, P("data") if lay.sharded else P())
  slot0 = jax.device_put(np.int32(0), NamedSharding(mesh, P()))
  take = exchange.take_program(mesh, lay)
  carry, have, served, widths = None, 0, [], []
  for r, (rows, order) in enumerate(rounds):
    moves = exchange.plan(order[skip if r == 0 else 0:], have, lay)
    widths.append(moves.m)
    steps = [{"h": jax.device_put(s.reshape(batch, T, D), spec)}
             for s in np.split(rows, STEPS)]
    if carry is None:
      carry = {"h": jax.device_put(np.zeros((lay.size, D), np.float32),
                                   NamedSharding(mesh, P("data")))}
    mix = exchange.mix_program(mesh, lay, moves.m)
    pool = mix(carry, steps, *exchange.put(moves, mesh))
    at = slot0
    for _ in range(moves.full):
      block, at = take(pool, at)
      assert block["h"].sharding.spec[0] == "data"
      served.append(np.asarray(block["h"]))
    carry, _ = take(pool, at)
    have = moves.left
  return np.concatenate(served), widths, (mix, carry, steps, moves)


@pytest.mark.parametrize("mesh_shape, batch", [((4, 2), 16), ((8, 1), 16), ((1, 1), 16),
                                               ((4, 2), 6)])
def test_blocks_are_the_stream_in_order_across_rounds_and_a_mid_round_start(mesh_shape, batch):
  """Three rounds, a start 23 rows into the first: every block equals the next ``SIZE`` rows
  of the mixed stream, the rows carried over a round's end included. ``batch`` 6 does not
  split over 4 shards: the rows are replicated and gathered locally."""
  mesh = sharding.make_mesh(MeshConfig(data=mesh_shape[0], model=mesh_shape[1],
                                       devices=mesh_shape[0] * mesh_shape[1]))
  rng = np.random.default_rng(0)
  rounds = [_round(rng, batch) for _ in range(3)]
  lay = exchange.layout(mesh_shape[0], SIZE, STEPS * batch * T, batch * T, T,
                        batch % mesh_shape[0] == 0)
  assert lay.sharded == (batch == 16)
  got, widths, _ = _serve(mesh, lay, rounds, skip=23)
  stream = np.concatenate([rows[order[23 if r == 0 else 0:]]
                           for r, (rows, order) in enumerate(rounds)])
  assert len(got) == len(stream) // SIZE * SIZE and len(got) >= 3 * SIZE
  np.testing.assert_array_equal(got, stream[:len(got)])
  if lay.sharded and mesh_shape[0] > 1:  # the all-to-all is about a round's share wide
    assert max(widths) * mesh_shape[0] ** 2 < 2 * STEPS * batch * T


def test_each_row_crosses_once_and_no_device_holds_a_round():
  """The compiled mix program on (8, 1): one all-to-all, no all-gather, and temp memory per
  device below one whole round's rows (the global gather it replaces held the round on every
  device)."""
  mesh = sharding.make_mesh(MeshConfig(data=8, model=1))
  batch, rng = 64, np.random.default_rng(1)
  lay = exchange.layout(8, 256, STEPS * batch * T, batch * T, T, True)
  _, _, (mix, carry, steps, moves) = _serve(mesh, lay, [_round(rng, batch)], skip=0)
  compiled = mix.lower(carry, steps, *exchange.put(moves, mesh)).compile()
  hlo = compiled.as_text()
  assert hlo.count("all-to-all(") == 1 and "all-gather" not in hlo, hlo
  round_bytes = STEPS * batch * T * D * 4
  assert compiled.memory_analysis().temp_size_in_bytes < round_bytes / 2
