r"""Checkpoint costs of the trainer: how long a save stalls the step loop, how long the write
takes in the background, and how soon a restart runs its first new step.

Prints JSON lines. The stall must not exceed the write itself (Orbax copies device buffers to
host, then writes asynchronously while training continues).

  python experiments/benchmarks/checkpoint.py            # d_in=512 d_sae=8192 batch=4096
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 512, "activation width")
flags.DEFINE_integer("d_sae", 8192, "latents")
flags.DEFINE_integer("k", 32, "active latents")
flags.DEFINE_integer("batch", 4096, "tokens per step")
flags.DEFINE_integer("saves", 5, "timed saves")


def main(argv):
  del argv
  import jax
  import numpy as np

  import sae_jax as sj
  from sae_jax.train import init_train_state, make_train_step
  from sae_jax.train.checkpoint import Checkpointer, abstract_state
  from sae_jax.train.state import _init_state

  cfg = sj.SAEConfig(d_in=FLAGS.d_in, d_sae=FLAGS.d_sae, k=FLAGS.k)
  tcfg = sj.TrainConfig(batch_size=FLAGS.batch)
  mesh = sj.make_mesh()
  x = jax.random.normal(jax.random.key(0), (FLAGS.batch, FLAGS.d_in))
  state = init_train_state(cfg, tcfg, mesh, x)
  step = make_train_step(cfg, tcfg, mesh)
  state, m = step(state, x)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(3):
    state, m = step(state, x)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t) / 3
  n_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
  with tempfile.TemporaryDirectory() as d:
    ckpt = Checkpointer(os.path.join(d, "state"), keep=2)
    blocking, total = [], []
    for i in range(FLAGS.saves):
      state, m = step(state, x)
      jax.block_until_ready(state)
      t = time.perf_counter()
      ckpt.save(i + 1, state, {"served": i + 1, "batch_size": FLAGS.batch})
      blocking.append(time.perf_counter() - t)
      ckpt.wait()
      total.append(time.perf_counter() - t)
    print(json.dumps({"name": "checkpoint_save", "state_mb": round(n_bytes / 2**20, 1),
                      "step_s": round(step_s, 4),
                      "save_blocking_s": round(float(np.median(blocking)), 4),
                      "save_total_s": round(float(np.median(total)), 4),
                      "blocking_over_total": round(float(np.median(blocking) / np.median(total)),
                                                   3)}), flush=True)
    ckpt.close()
    # A restart: a fresh checkpointer and step function, restore, first new step.
    t = time.perf_counter()
    ckpt = Checkpointer(os.path.join(d, "state"), keep=2)
    step2 = make_train_step(cfg, tcfg, mesh)
    shapes = jax.eval_shape(lambda: _init_state(cfg, tcfg, None, jax.random.key(0)))
    restored, _ = ckpt.restore_latest(abstract_state(step2.state_shardings, shapes))
    t_restore = time.perf_counter() - t
    restored, m = step2(restored, x)
    jax.block_until_ready(restored)
    print(json.dumps({"name": "restart_to_first_step", "restore_s": round(t_restore, 3),
                      "first_step_s_including_compile": round(time.perf_counter() - t
                                                              - t_restore, 3),
                      "total_s": round(time.perf_counter() - t, 3)}), flush=True)
    ckpt.close()


if __name__ == "__main__":
  app.run(main)
