"""Learning per token: a TopK SAE trained with the defaults, as a new user would, recovers planted
sparse directions; a warm-up longer than half the run is warned about, once.

The thresholds (held-out FVU < 0.15, >= 80% of the directions within cos 0.9) were fixed
before the fix, the default encoder init then being ``tied`` (W_enc = W_dec^T, unit rows). The
run was first 200 steps, too short for any system (sparsify: FVU 0.25, nothing recovered); it
was lengthened to 600 steps with the thresholds unchanged. There, ``tied`` gives FVU 0.20 with
25% recovered and fails; the ``linear`` init (the default of rounds 6-8) gives 0.114-0.120 with
83-85% over seeds 0-2, sparsify 0.114-0.118 with 79-84% (seeds 0-1).

Round 9 made ``data`` the TopK default (``encoder_init="auto"``). Its test below compares it with
``linear`` (sparsify's init, whose trajectories match sparsify's from the same weights) under the
default warm-up, longer than the run, where the start is most of the result. Its thresholds
were fixed before the change was run on this case: FVU at most 0.8 of linear's, and no more
dead latents (firing on none of 32,768 held-out tokens) than linear's.
"""

import warnings

import numpy as np
import pytest

import sae_jax as sj


def planted(seed, n, d=32, p=128, active=3, noise=0.01):
  """n tokens, each a sum of ``active`` of ``p`` unit directions with magnitudes 0.5-2."""
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((p, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  idx = np.argpartition(rng.random((n, p)), active, axis=1)[:, :active]
  x = np.einsum("na,nad->nd", rng.uniform(0.5, 2.0, (n, active)), dirs[idx])
  return (x + noise * rng.standard_normal(x.shape)).astype(np.float32), dirs


# One of the suite's eight CPU devices: learning is under test, not the mesh (test_train_step
# compares meshes), and eight-way splits of these small steps cost more than they spread.
def _one_device():
  return sj.make_mesh(sj.MeshConfig(devices=1))


def test_defaults_recover_planted_directions():
  x, dirs = planted(0, 512 * 600 + 4096)
  train, held = x[4096:], x[:4096]
  cfg = sj.SAEConfig(d_in=32, d_sae=256, k=6)
  tcfg = sj.TrainConfig(batch_size=512, total_tokens=len(train),
                        optim=sj.OptimConfig(lr=1e-3, warmup_steps=0))
  sae = sj.train_sae(train, cfg, tcfg, log_fn=lambda s: None, mesh=_one_device())
  x_hat = np.asarray(sae.reconstruct(held))
  fvu = ((x_hat - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
  w = np.asarray(sae.params["W_dec"])
  recovered = ((dirs @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(1) > 0.9).mean()
  assert fvu < 0.15, fvu
  assert recovered >= 0.8, recovered


def _train(warmup, steps, batch=64):
  x, _ = planted(1, batch * steps, d=8, p=16)
  cfg = sj.SAEConfig(d_in=8, d_sae=16, k=2)
  tcfg = sj.TrainConfig(batch_size=batch, optim=sj.OptimConfig(warmup_steps=warmup))
  logs = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sj.train_sae(x, cfg, tcfg, log_fn=logs.append, mesh=_one_device())
  return [w for w in caught if "warm-up" in str(w.message)], [s for s in logs if "warm-up" in s]


def test_warmup_longer_than_half_the_run_warns_once():
  caught, logs = _train(warmup=6, steps=10)
  assert len(caught) == 1 and len(logs) == 1, (caught, logs)
  assert "6 steps" in str(caught[0].message) and "10 steps" in str(caught[0].message)


@pytest.mark.parametrize("warmup", [0, 5])
def test_warmup_within_half_the_run_is_silent(warmup):
  assert _train(warmup=warmup, steps=10) == ([], [])


def _fit_and_score(x, held, cfg, tcfg):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the long warm-up's warning: under test above
    sae = sj.train_sae(x, cfg, tcfg, log_fn=lambda s: None, mesh=_one_device())
  x_hat = np.asarray(sae.reconstruct(held))
  fvu = ((x_hat - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
  vals, idx = (np.asarray(a) for a in sae.encode(held))
  fired = np.zeros(cfg.d_sae, bool)
  fired[idx[vals > 0]] = True
  return fvu, float(1.0 - fired.mean())


def test_default_init_learns_more_than_linear_under_the_default_warmup():
  x, _ = planted(2, 512 * 200 + 32768)
  train, held = x[32768:], x[:32768]
  cfg = sj.SAEConfig(d_in=32, d_sae=256, k=6)
  tcfg = sj.TrainConfig(batch_size=512, total_tokens=len(train))  # default warm-up: 1000 steps
  fvu, dead = _fit_and_score(train, held, cfg, tcfg)
  fvu_lin, dead_lin = _fit_and_score(train, held, cfg, tcfg.replace(encoder_init="linear"))
  assert fvu <= 0.8 * fvu_lin, (fvu, fvu_lin)
  assert dead <= dead_lin, (dead, dead_lin)


def test_lazy_updates_keep_every_latent_alive_where_plain_adam_loses_some():
  """The default TopK step leaves a latent that no token selected where it was (lazy updates).
  On this planted case, run to convergence (1,200 steps), plain Adam from the same init loses
  7 of 256 latents for good (firing on none of 32,768 held-out tokens; 1 at 600 steps); the
  case was picked after seeing that. The claim under test: none with lazy updates, at an FVU
  within 0.002 of plain Adam's (measured: 0.0997 vs 0.0995)."""
  x, _ = planted(0, 512 * 1200 + 32768)
  train, held = x[32768:], x[:32768]
  cfg = sj.SAEConfig(d_in=32, d_sae=256, k=6)
  tcfg = sj.TrainConfig(batch_size=512, total_tokens=len(train),
                        optim=sj.OptimConfig(lr=1e-3, warmup_steps=0))
  fvu, dead = _fit_and_score(train, held, cfg, tcfg)
  fvu_plain, dead_plain = _fit_and_score(train, held, cfg, tcfg.replace(lazy_updates=False))
  assert dead_plain > 0.01, dead_plain  # the case loses latents under plain Adam
  assert dead == 0.0, dead
  assert fvu <= fvu_plain + 0.002, (fvu, fvu_plain)
