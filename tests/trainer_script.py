"""A training run for the kill/resume tests: python trainer_script.py WORKDIR OUT.npz [STEPS]."""
import sys

import jax
import numpy as np
from absl import logging

import sae_jax as sj


def main(workdir, out, steps=300):
  logging.set_verbosity(logging.WARNING)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(20_000, 64)) * np.linspace(0.2, 2.0, 64)).astype(np.float32)
  cfg = sj.SAEConfig(architecture="topk", d_in=64, d_sae=2048, k=8)
  tcfg = sj.TrainConfig(batch_size=512, total_tokens=512 * steps, eval_tokens=1024,
                        dead_tokens=512 * 5, optim=sj.OptimConfig(lr=1e-3, warmup_steps=10),
                        run=sj.RunConfig(checkpoint_every=20, keep_checkpoints=2, log_every=10, eval_every=50))
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  sae = sj.train_sae(x, cfg, tcfg, workdir=workdir, mesh=mesh)
  np.savez(out, **{k: np.asarray(v) for k, v in sae.params.items()})


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
