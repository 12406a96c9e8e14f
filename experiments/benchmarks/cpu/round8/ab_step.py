"""Interleaved A/B of the train step in one process: the parent commit against this tree.

The parent is a copy renamed to the package ``sae_jax_base`` (its FFI targets renamed with it):
  git archive bb2c104 sae_jax | tar -x -C X && mv X/sae_jax BASE/sae_jax_base
  grep -rl sae_jax BASE/sae_jax_base | xargs sed -i -E 's/\\bsae_jax/sae_jax_base/g'
Env: BASE_DIR (holds sae_jax_base), ROUNDS, STEPS, DEADS (dead fractions, comma separated).
Prints the mean / median step seconds of both and new / base, with the load average.
"""
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.environ.get("BASE_DIR", "/tmp/auxk2/basepkg"))
d, m, k, n = 512, 8192, 32, 4096
rounds, steps = int(os.environ.get("ROUNDS", "4")), int(os.environ.get("STEPS", "5"))
deads = [float(v) for v in os.environ.get("DEADS", "0.25,0").split(",")]
x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)


def make(pkgname, dead):
  """A step closure of package ``pkgname`` with the first ``dead`` share of latents dead."""
  sj = importlib.import_module(pkgname)
  tr = importlib.import_module(pkgname + ".train")
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=m, k=k)
  tcfg = sj.TrainConfig(batch_size=n)
  mesh = sj.make_mesh()
  box = [tr.init_train_state(cfg, tcfg, mesh, x)]
  step = tr.make_train_step(cfg, tcfg, mesh)
  dm = jnp.arange(m) < int(m * dead)
  # As sae_step.py does: the same latents stay dead on every step.
  mark = jax.jit(lambda s: s.replace(tokens_since_fired=jnp.where(
      dm, tcfg.dead_tokens, s.tokens_since_fired)), donate_argnums=0)

  def run():
    box[0], met = step(mark(box[0]) if dead else box[0], x)
    return met["loss"]

  for _ in range(2):
    jax.block_until_ready(run())
  return run


for dead in deads:
  runs = {"base": make("sae_jax_base", dead), "new": make("sae_jax", dead)}
  times = {name: [] for name in runs}
  for r in range(rounds):  # alternate which goes first
    for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
      for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t)
  mean = {name: round(float(np.mean(v)), 4) for name, v in times.items()}
  median = {name: round(float(np.median(v)), 4) for name, v in times.items()}
  print(json.dumps({"dead": dead, "mean": mean, "median": median,
                    "new_over_base_mean": round(mean["new"] / mean["base"], 3),
                    "load": os.getloadavg()[0]}), flush=True)
