"""Interleaved A/B of the train step in one process: a copy of the parent commit renamed to the package sae_jax_base (git archive bb2c104 sae_jax, every "sae_jax" renamed, under /tmp/auxk2/basepkg) against this tree. Env: ROUNDS, STEPS, DEADS (dead fractions)."""
import os, sys, time, json, importlib
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "/tmp/auxk2/basepkg")
d, m, k, n = 512, 8192, 32, 4096
rounds = int(os.environ.get("ROUNDS", "4")); steps = int(os.environ.get("STEPS", "5"))
deads = [float(v) for v in os.environ.get("DEADS", "0.25,0").split(",")]
x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)

def make(pkgname, dead):
  sj = importlib.import_module(pkgname)
  tr = importlib.import_module(pkgname + ".train")
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=m, k=k)
  tcfg = sj.TrainConfig(batch_size=n)
  mesh = sj.make_mesh()
  box = [tr.init_train_state(cfg, tcfg, mesh, x)]
  step = tr.make_train_step(cfg, tcfg, mesh)
  dm = jnp.arange(m) < int(m * dead)
  mark = jax.jit(lambda s: s.replace(tokens_since_fired=jnp.where(dm, tcfg.dead_tokens, s.tokens_since_fired)), donate_argnums=0)
  def run():
    box[0], met = step(mark(box[0]) if dead else box[0], x)
    return met["loss"]
  for _ in range(2): jax.block_until_ready(run())
  return run

for dead in deads:
  runs = {"base": make("sae_jax_base", dead), "new": make("sae_jax", dead)}
  tot = {kk: [] for kk in runs}
  for r in range(rounds):
    for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
      for _ in range(steps):
        t = time.perf_counter(); jax.block_until_ready(fn()); tot[name].append(time.perf_counter() - t)
  res = {kk: round(float(np.mean(v)), 4) for kk, v in tot.items()}
  med = {kk: round(float(np.median(v)), 4) for kk, v in tot.items()}
  print(json.dumps({"dead": dead, "mean": res, "median": med, "new_over_base_mean": round(res["new"] / res["base"], 3),
                    "load": os.getloadavg()[0]}), flush=True)
