"""The FFI CPU top-k equals lax.top_k exactly (values, indices, ties, -0/+0, -inf rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sae_jax.kernels import cpu_topk


@pytest.fixture(autouse=True, scope="module")
def _registered():
  # available() registers the FFI targets the tests below call directly: on an xdist worker
  # that did not run test_builds_on_this_machine first they were missing (NOT_FOUND).
  cpu_topk.available()


def test_builds_on_this_machine():
  # CI and developer machines have a C++ compiler: the fast path must be the one tested.
  assert cpu_topk.available()


@pytest.mark.parametrize("shape, k", [((7, 1), 1), ((33, 50), 1), ((33, 50), 13), ((5, 97), 97),
                                      ((300, 1000), 32), ((64, 8192), 256), ((3, 4, 65), 9)])
def test_matches_lax_top_k_on_random_rows(shape, k):
  x = jax.random.normal(jax.random.key(k), shape)
  vals, idx = jax.jit(lambda x: cpu_topk.ffi_top_k(x, k))(x)
  ref_vals, ref_idx = lax.top_k(x, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(vals, ref_vals)


def test_ties_signed_zero_and_infinities_follow_lax_order():
  x = jnp.round(jax.random.normal(jax.random.key(1), (64, 100)) * 2) / 2  # many exact ties
  x = x.at[:, :4].set(jnp.array([-0.0, 0.0, -0.0, 0.0]))
  x = x.at[:10, 5:].set(-jnp.inf)  # fewer finite values than k in some rows
  x = x.at[10:12, 7].set(jnp.inf)
  for k in (1, 3, 7, 50, 100):
    vals, idx = cpu_topk.ffi_top_k(x, k)
    ref_vals, ref_idx = lax.top_k(x, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(np.signbit(vals), np.signbit(ref_vals))
    np.testing.assert_array_equal(vals, ref_vals)


@pytest.mark.parametrize("n_dead, k", [(2048, 1), (2048, 256), (2048, 2100), (256, 300)])
@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_auxk_masked_rows_match_lax_top_k(n_dead, k, layout):
  # AuxK's input: live latents masked to -inf, so the block threshold is often -inf itself and
  # most of a row ties with it (k > n_dead picks -inf ties, by index).
  x = jnp.round(jax.random.normal(jax.random.key(3), (24, 8192)) * 8) / 8  # exact ties too
  dead = jnp.arange(8192) < n_dead
  if layout == "scattered":
    dead = jax.random.permutation(jax.random.key(4), dead)
  # Rows whose dead latents are mostly -inf themselves: the k-th value is a -inf that ties
  # with the masked columns (the lower index wins, dead or not).
  x = x.at[:4].set(jnp.where(jnp.arange(8192) % 16 == 0, x[:4], -jnp.inf))
  masked = jnp.where(dead[None], x, -jnp.inf)
  ref_vals, ref_idx = lax.top_k(masked, k)
  for vals, idx in (jax.jit(lambda x: cpu_topk.ffi_top_k(x, k))(masked),
                    jax.jit(lambda x, d: cpu_topk.ffi_masked_top_k(x, d, k))(x, dead)):
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(vals, ref_vals)


@pytest.mark.parametrize("k", [256, 300, 1023])
def test_large_k_rows_ordered_by_every_byte(k):
  # k >= m / 8 takes the radix path: keys that share their top bytes and differ (or tie) only
  # in the low ones, so a selection that stopped at a higher byte would pick by index.
  m = 2048
  base = np.array([0x3F800000, 0xBF800000], np.uint32)  # 1.0 and -1.0: sign and exponent shared
  steps = np.stack([np.random.default_rng(r).permutation(m) // 2 for r in range(6)])  # ties
  bits = base[np.arange(6) % 2][:, None] + steps.astype(np.uint32)
  x = jnp.asarray(bits.view(np.float32))
  ref_vals, ref_idx = lax.top_k(x, k)
  everything = jnp.ones((m,), bool)
  for vals, idx in (jax.jit(lambda x: cpu_topk.ffi_top_k(x, k))(x),
                    jax.jit(lambda x, d: cpu_topk.ffi_masked_top_k(x, d, k))(x, everything)):
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(vals, ref_vals)


@pytest.mark.parametrize("k", [1, 32, 256])
def test_bias_is_added_as_xla_adds_it(k):
  # The encoder's selections add b_enc themselves: same values and order as top_k(x + b),
  # signed zeros included (-0.0 + 0.0 is +0.0).
  assert cpu_topk.available()  # registers the targets
  x = jnp.round(jax.random.normal(jax.random.key(5), (40, 2048)) * 4) / 4
  x = x.at[:, :8].set(-0.0)
  bias = jnp.round(jax.random.normal(jax.random.key(6), (2048,)) * 4) / 4
  bias = bias.at[:4].set(0.0)
  dead = jax.random.bernoulli(jax.random.key(7), 0.3, (2048,))
  ref = lax.top_k(x + bias, k)
  got = jax.jit(lambda x, b: cpu_topk.ffi_top_k(x, k, b))(x, bias)
  masked_ref = lax.top_k(jnp.where(dead[None], x + bias, -jnp.inf), k)
  masked = jax.jit(lambda x, d, b: cpu_topk.ffi_masked_top_k(x, d, k, b))(x, dead, bias)
  for (vals, idx), (ref_vals, ref_idx) in ((got, ref), (masked, masked_ref)):
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(np.signbit(vals), np.signbit(ref_vals))
    np.testing.assert_array_equal(vals, ref_vals)
