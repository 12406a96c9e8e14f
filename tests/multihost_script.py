"""One SAE trained over every process's devices: python multihost_script.py WORKDIR OUT.npz.

Run alone (one process) or under launch/local_multiprocess.sh (several); with the same total
device count both must give the same SAE. The mesh is 2 x (devices / 2): rows on "data",
latents on "model", both spanning processes when there are several.
"""
import sys

import jax
import numpy as np
from absl import logging

import sae_jax as sj
from sae_jax import distributed


def main(workdir, out, steps=40):
  distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(8_192, 32)) * np.linspace(0.2, 2.0, 32)).astype(np.float32)
  cfg = sj.SAEConfig(architecture="topk", d_in=32, d_sae=256, k=4)
  tcfg = sj.TrainConfig(batch_size=256, total_tokens=256 * abs(steps), eval_tokens=512,
                        dead_tokens=256 * 4, optim=sj.OptimConfig(lr=2e-3, warmup_steps=5),
                        run=sj.RunConfig(checkpoint_every=10 if steps <= 40 else 50, log_every=10,
                                         eval_every=20))
  mesh = sj.make_mesh(sj.MeshConfig(data=jax.device_count() // 2, model=2))
  if steps < 0:
    # Per-host streams of unequal length (process p holds 7 + 3p half-batches, one pass):
    # every host must stop at the shortest, together.
    p = jax.process_index()
    mine = x[p * 3000:p * 3000 + 128 * (7 + 3 * p)]
    source = [mine[i:i + 64] for i in range(0, len(mine), 64)]
    sae = sj.train_sae(source, cfg, tcfg.replace(total_tokens=None, eval_tokens=0,
                                                 run=tcfg.run.replace(eval_every=0),
                                                 shuffle_batches=1),
                       workdir=workdir, mesh=mesh)
  else:
    sae = sj.train_sae(x, cfg, tcfg, workdir=workdir, mesh=mesh)
  if distributed.is_primary():
    np.savez(out, **{k: np.asarray(v) for k, v in sae.params.items()}, steps=sae.metadata["steps"],
             processes=jax.process_count(), devices=jax.device_count())


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
