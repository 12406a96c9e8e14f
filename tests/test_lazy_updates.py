"""Lazy updates (``TrainConfig.lazy_updates``): a TopK latent that no token selected keeps its
parameters for the step, instead of Adam's momentum carrying it further out of the top-k."""

import jax
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.train import init_train_state, make_train_step

D, M, N = 8, 16, 32


def _params():
  """Latents 0-7 along the unit axes; 8-15 can never fire (zero encoder, b_enc -1)."""
  w_enc = np.zeros((D, M), np.float32)
  w_enc[:, :D] = 0.8 * np.eye(D)  # short of the fit: step 1 has a gradient to follow
  w_dec = np.zeros((M, D), np.float32)
  w_dec[:D] = np.eye(D)
  w_dec[D:] = np.eye(D)
  b_enc = np.zeros(M, np.float32)
  b_enc[D:] = -1.0
  return {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": np.zeros(D, np.float32)}


def _tokens(axes, seed):
  """N tokens, each a positive multiple of one of ``axes`` plus a small positive rest."""
  rng = np.random.default_rng(seed)
  x = np.full((N, D), 0.0, np.float32)
  x[np.arange(N), rng.choice(axes, N)] = rng.uniform(0.5, 2.0, N)
  return x + 0.01 * rng.uniform(size=(N, D)).astype(np.float32) * np.isin(np.arange(D), axes)


def _two_steps(lazy, mesh):
  """Step 1 selects latents 0-7; step 2 only latents 0-3. Params before and after step 2."""
  cfg = sj.SAEConfig(d_in=D, d_sae=M, k=2)
  tcfg = sj.TrainConfig(batch_size=N, lazy_updates=lazy, aux_k=0,
                        optim=sj.OptimConfig(lr=1e-2, warmup_steps=0))
  x1, x2 = _tokens(np.arange(8), 0), _tokens(np.arange(4), 1)
  state = init_train_state(cfg, tcfg, mesh, x1, init_params=_params())
  step = make_train_step(cfg, tcfg, mesh)
  state, _ = step(state, x1)
  before = {k: np.asarray(v) for k, v in state.params.items()}
  state, _ = step(state, x2)
  return before, {k: np.asarray(v) for k, v in state.params.items()}


def _latent_slices(p, latents):
  return [p["W_enc"][:, latents], p["b_enc"][latents], p["W_dec"][latents]]


@pytest.mark.parametrize("shape", [(1, 1), (2, 4)])
def test_unselected_latents_keep_their_parameters_only_when_lazy(shape):
  mesh = sj.make_mesh(sj.MeshConfig(data=shape[0], model=shape[1]),
                      devices=jax.devices()[:shape[0] * shape[1]])
  before, after = _two_steps(True, mesh)
  for a, b in zip(_latent_slices(before, slice(4, 8)), _latent_slices(after, slice(4, 8))):
    np.testing.assert_array_equal(a, b)  # selected at step 1, not at step 2: kept
  moved = [np.abs(a - b).max() for a, b in zip(_latent_slices(before, slice(0, 4)),
                                                _latent_slices(after, slice(0, 4)))]
  assert min(moved[0].max(), moved[2].max()) > 0, moved  # selected latents still learn
  # Plain Adam: the same latents move on their step-1 momentum alone.
  before_p, after_p = _two_steps(False, mesh)
  assert np.abs(before_p["W_enc"][:, 4:8] - after_p["W_enc"][:, 4:8]).max() > 1e-4
  # Everything else is the plain step's: the lazy step only keeps the untouched latents.
  for name in ("b_dec",):
    np.testing.assert_allclose(after[name], after_p[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(after["W_enc"][:, :4], after_p["W_enc"][:, :4], rtol=1e-5,
                             atol=1e-6)


def test_runs_recorded_before_lazy_updates_load_as_plain_adam():
  d = sj.TrainConfig().to_dict()
  assert d.pop("lazy_updates") is True
  assert sj.TrainConfig.from_dict(d).lazy_updates is False
