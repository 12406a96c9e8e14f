"""Analysis II: feature matching (activations and decoders), the one-to-one assignment."""

import jax
import jax.numpy as jnp
import numpy as np

import sae_jax as sj
from sae_jax.analysis import assign_one_to_one, match_activations, match_decoders
from sae_jax.saes.sae import SAE


def _random_sae(d=24, m=96, k=4, seed=0):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(m, d)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=m, k=k, normalize="none")
  params = {"W_enc": jnp.asarray(w_dec.T), "b_enc": jnp.zeros(m), "W_dec": jnp.asarray(w_dec),
            "b_dec": jnp.zeros(d)}
  return SAE(cfg, params, {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})


def _permuted(sae, perm):
  """The same SAE with latent j of the copy = latent perm[j] of the original."""
  p = sae.params
  params = {"W_enc": p["W_enc"][:, perm], "b_enc": p["b_enc"][perm], "W_dec": p["W_dec"][perm],
            "b_dec": p["b_dec"]}
  return SAE(sae.cfg, params, sae.buffers)


def _codes(sae, x):
  v, i = sae.encode(x)
  return np.asarray(v), np.asarray(i)


def test_self_match_is_complete():
  sae = _random_sae()
  x = np.random.default_rng(1).normal(size=(4000, 24)).astype(np.float32)
  codes = _codes(sae, x)
  m = match_activations(codes, codes, 96, 96)
  live = np.bincount(codes[1][codes[0] > 0].ravel(), minlength=96) > 0
  assert live.sum() > 80
  np.testing.assert_array_equal(m.assignment[live], np.arange(96)[live])
  np.testing.assert_allclose(m.assignment_score[live], 1.0, atol=1e-5)
  assert m.overlap(0.99, live) == 1.0 and m.mutual[live].all()
  d = match_decoders(sae, sae)
  np.testing.assert_array_equal(d.assignment, np.arange(96))
  assert d.overlap(0.999) == 1.0


def test_permuted_copy_is_matched_back_exactly():
  sae = _random_sae(seed=2)
  perm = np.random.default_rng(3).permutation(96)
  copy = _permuted(sae, perm)
  x = np.random.default_rng(4).normal(size=(4000, 24)).astype(np.float32)
  a, b = _codes(sae, x), _codes(copy, x)
  live = np.bincount(a[1][a[0] > 0].ravel(), minlength=96) > 0
  m = match_activations(a, b, 96, 96)
  inverse = np.argsort(perm)  # original latent f sits at position inverse[f] of the copy
  np.testing.assert_array_equal(m.assignment[live], inverse[live])
  np.testing.assert_array_equal(match_decoders(sae, copy).assignment, inverse)


def test_independent_saes_barely_overlap():
  rng = np.random.default_rng(5)
  n, k, m = 20_000, 8, 512
  a = (rng.random((n, k)).astype(np.float32) + 0.1, rng.integers(0, m, (n, k)))
  b = (rng.random((n, k)).astype(np.float32) + 0.1, rng.integers(0, m, (n, k)))
  match = match_activations(a, b, m, m)
  assert match.overlap(0.5) == 0.0 and float(np.abs(match.best_score).max()) < 0.2
  dec = match_decoders(_random_sae(d=64, m=512, seed=6), _random_sae(d=64, m=512, seed=7))
  assert dec.overlap(0.7) < 0.01


def test_assignment_is_one_to_one_and_beats_greedy():
  # A0's best is B0, but A1 can only take B0: the optimum gives A0 -> B1 and A1 -> B0.
  cand = np.array([[0, 1], [0, -1]])
  score = np.array([[0.9, 0.8], [0.85, -np.inf]], np.float32)
  assign, s = assign_one_to_one(cand, score)
  assert assign.tolist() == [1, 0] and np.allclose(s, [0.8, 0.85])
  # Unassigned beats a negative score.
  assign, s = assign_one_to_one(np.array([[0]]), np.array([[-0.3]], np.float32))
  assert assign.tolist() == [-1] and s.tolist() == [0.0]


def test_two_seeds_recover_planted_features_and_match_each_other():
  """Planted sparse dictionary: SAEs of two init seeds find it, and each other."""
  rng = np.random.default_rng(8)
  d, n_true, n = 32, 48, 60_000
  true = rng.normal(size=(n_true, d)).astype(np.float32)
  true /= np.linalg.norm(true, axis=1, keepdims=True)
  codes = np.zeros((n, n_true), np.float32)
  for j in range(3):  # three active planted features per token
    codes[np.arange(n), rng.integers(0, n_true, n)] = rng.uniform(0.5, 1.5, n)
  x = codes @ true
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=64, k=3, normalize="none")
  tcfg = sj.TrainConfig(batch_size=512, total_tokens=512 * 600, lr=3e-3, warmup_steps=20,
                        eval_tokens=0, eval_every=0, dead_tokens=512 * 50)
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  saes = sj.train_saes(x, [sj.SAEJob(cfg, tcfg, init_seed=1), sj.SAEJob(cfg, tcfg, init_seed=2)],
                       mesh)
  planted = SAE(sj.SAEConfig(architecture="topk", d_in=d, d_sae=n_true, k=3, normalize="none"),
                {"W_enc": jnp.asarray(true.T), "b_enc": jnp.zeros(n_true),
                 "W_dec": jnp.asarray(true), "b_dec": jnp.zeros(d)},
                {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})
  found = [match_decoders(planted, s) for s in saes]
  for m in found:
    assert m.overlap(0.9) >= 0.9, m.assignment_score
  # The two seeds match each other where both found a planted feature: by decoders, and by
  # activations over the same tokens.
  cross = match_decoders(saes[0], saes[1])
  both = [(int(found[0].assignment[j]), int(found[1].assignment[j])) for j in range(n_true)
          if found[0].assignment_score[j] >= 0.9 and found[1].assignment_score[j] >= 0.9]
  assert len(both) >= 0.8 * n_true
  agree = np.mean([cross.assignment[a] == b for a, b in both])
  assert agree >= 0.95, agree
  held = x[:8000]
  act = match_activations(_codes(saes[0], held), _codes(saes[1], held), 64, 64)
  agree_act = np.mean([act.assignment[a] == b and act.assignment_score[a] > 0.8 for a, b in both])
  assert agree_act >= 0.9, agree_act
