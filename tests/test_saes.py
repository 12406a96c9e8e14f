"""Each architecture's inference forward against a NumPy reference; shared pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.errors import DataError
from sae_jax.saes import registry
from sae_jax.saes.base import expected_norm_scale, geometric_median
from sae_jax.saes.jumprelu import heaviside, jumprelu

D, M, K, N = 19, 211, 7, 31  # distinct primes: a transposed axis cannot pass by accident


def _sae(arch, normalize="none", seed=0):
  cfg = sj.SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K, normalize=normalize)
  a = registry.get(arch)
  key, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = a.init_params(key, cfg)
  # Non-trivial biases and thresholds so every term of the forward matters.
  params["b_enc"] = 0.1 * jax.random.normal(k2, (M,))
  params["b_dec"] = 0.1 * jax.random.normal(k3, (D,))
  buffers = a.init_buffers(cfg)
  if arch == "jumprelu":
    params["log_threshold"] = jnp.log(jnp.linspace(0.01, 0.3, M))
  if arch == "batchtopk":
    buffers["threshold"] = jnp.float32(0.15)
  if normalize == "expected_norm":
    buffers["norm_scale"] = jnp.float32(0.37)
  return sj.SAE(cfg, params, buffers)


def _numpy_forward(sae, x):
  p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
  x = np.asarray(x, np.float64)
  if sae.cfg.normalize == "unit_norm":
    scale = 1 / np.linalg.norm(x, axis=1, keepdims=True)
  elif sae.cfg.normalize == "expected_norm":
    scale = np.full((len(x), 1), float(sae.buffers["norm_scale"]))
  else:
    scale = np.ones((len(x), 1))
  pre = (x * scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
  arch = sae.cfg.architecture
  if arch == "topk":
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :K]
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
  elif arch == "batchtopk":
    acts = np.where(pre > float(sae.buffers["threshold"]), np.maximum(pre, 0), 0)
  elif arch == "jumprelu":
    acts = pre * (pre > np.exp(p["log_threshold"]))
  else:
    acts = np.maximum(pre, 0)
  recon = (acts @ p["W_dec"] + p["b_dec"]) / scale
  return acts, recon


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
@pytest.mark.parametrize("normalize", ["none", "unit_norm", "expected_norm"])
def test_forward_matches_numpy(arch, normalize):
  sae = _sae(arch, normalize)
  x = 3.0 * jax.random.normal(jax.random.key(1), (N, D))
  acts_ref, recon_ref = _numpy_forward(sae, x)
  acts = np.asarray(sae.encode_dense(x))
  np.testing.assert_allclose(acts, acts_ref, rtol=1e-5, atol=1e-5)
  assert (acts_ref > 0).any() and (acts_ref == 0).any()
  np.testing.assert_allclose(sae.reconstruct(x), recon_ref, rtol=1e-4, atol=1e-4)
  # The sparse view holds the k largest activations of the dense one.
  vals, idx = sae.encode(x, k=K)
  np.testing.assert_allclose(np.take_along_axis(acts_ref, np.asarray(idx), 1), vals,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.sort(acts_ref, 1)[:, ::-1][:, :K], vals, rtol=1e-5, atol=1e-5)
  # Both decoders against NumPy (normalised space, b_dec included): the dense one on every
  # activation, the sparse one on the K kept.
  W_dec, b_dec = (np.asarray(sae.params[n], np.float64) for n in ("W_dec", "b_dec"))
  np.testing.assert_allclose(sae.decode_dense(acts), acts_ref @ W_dec + b_dec, rtol=1e-5,
                             atol=1e-5)
  kept = np.zeros_like(acts_ref)
  np.put_along_axis(kept, np.asarray(idx), np.take_along_axis(acts_ref, np.asarray(idx), 1), 1)
  np.testing.assert_allclose(sae.decode(vals, idx), kept @ W_dec + b_dec, rtol=1e-5, atol=1e-5)


def test_encode_keeps_leading_axes_and_checks_width():
  sae = _sae("topk")
  x = jax.random.normal(jax.random.key(2), (2, 5, D))
  vals, idx = sae.encode(x)
  assert vals.shape == idx.shape == (2, 5, K)
  assert sae.reconstruct(x).shape == (2, 5, D)
  with pytest.raises(DataError, match=f"expects \\[..., {D}\\]"):
    sae.encode(jnp.zeros((3, D + 1)))


def test_init_decoder_is_encoder_transpose_with_unit_rows():
  cfg = sj.SAEConfig(architecture="topk", d_in=D, d_sae=M, k=K)
  p = registry.get("topk").init_params(jax.random.key(0), cfg)
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  assert not np.asarray(p["b_enc"]).any()


def test_geometric_median_resists_outliers_and_matches_weiszfeld():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 5)) + 2.0
  x[:20] += 100.0  # 10 % far outliers drag the mean, not the median
  y = np.asarray(geometric_median(jnp.asarray(x, jnp.float32), iters=200))
  ref = x.mean(0)
  for _ in range(200):
    w = 1 / np.linalg.norm(x - ref, axis=1)
    ref = (w[:, None] * x).sum(0) / w.sum()
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  assert np.linalg.norm(y - 2.0) < 1.0 < np.linalg.norm(x.mean(0) - 2.0)


def test_expected_norm_scale_gives_sqrt_d_average_norm():
  x = 5.0 * jax.random.normal(jax.random.key(3), (100, 64))
  s = expected_norm_scale(x)
  assert float(jnp.linalg.norm(x * s, axis=1).mean()) == pytest.approx(8.0, rel=1e-5)


def test_jumprelu_straight_through_gradients():
  z = jnp.array([[0.10, 0.2049, 0.2051, 0.5], [0.0, 0.1999, 0.3, 0.2001]])
  theta = jnp.array([0.2, 0.2, 0.2, 0.2])
  eps = 0.001
  g_theta = jax.grad(lambda t: jumprelu(z, t, eps).sum())(theta)
  # Only entries within eps/2 of theta pass: -(theta/eps) each.
  np.testing.assert_allclose(g_theta, [0.0, -200.0, 0.0, -200.0])
  g_z = jax.grad(lambda z: jumprelu(z, theta, eps).sum())(z)
  np.testing.assert_array_equal(g_z, (z > theta).astype(jnp.float32))
  g_theta0 = jax.grad(lambda t: heaviside(z, t, eps).sum())(theta)
  np.testing.assert_allclose(g_theta0, [0.0, -1000.0, 0.0, -1000.0])
  assert not jax.grad(lambda z: heaviside(z, theta, eps).sum())(z).any()


def test_linear_encoder_init_is_a_default_linear_layer_with_a_unit_decoder_copy():
  """The paper's (and sparsify's) init: W_enc uniform in +-1/sqrt(d_in), W_dec its
  unit-normalised transpose; the default ``tied`` init keeps W_enc = W_dec^T at unit norm."""
  cfg = sj.SAEConfig(d_in=37, d_sae=211, k=5)
  p = registry.get("topk").init_params(jax.random.key(0), cfg, "linear")
  w_enc, w_dec = np.asarray(p["W_enc"]), np.asarray(p["W_dec"])
  bound = 1 / np.sqrt(37)
  assert np.abs(w_enc).max() <= bound and np.abs(w_enc).max() > 0.95 * bound
  assert abs(w_enc.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform, not normal
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w_dec, w_enc.T / np.linalg.norm(w_enc.T, axis=1, keepdims=True),
                             rtol=1e-6)
  tied = registry.get("topk").init_params(jax.random.key(0), cfg)
  np.testing.assert_array_equal(np.asarray(tied["W_enc"]), np.asarray(tied["W_dec"]).T)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(tied["W_dec"]), axis=1), 1.0, rtol=1e-6)
