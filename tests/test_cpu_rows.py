"""The FFI CPU row kernels (``cpu_rows``) equal the scan form of ``rows.py``; gradients of the
sparse kernels do not change; ``SAE_JAX_CPU_ROWS=0`` falls back to the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.kernels import cpu_rows, rows, sparse_decode, topk_encode
from sae_jax.kernels.decode_pair import sparse_decode_pair

RTOL, ATOL = 1e-5, 1e-5  # fixed up front: float32 sums in a different order (ATOL x max |ref|)
SHAPES = [(7, 1, 5, 3), (50, 37, 97, 13), (64, 256, 300, 40), (33, 5, 2, 512)]  # n, j, m, d


def _case(n, j, m, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  r = jax.random.randint(ks[0], (n, j), 0, m + 1, jnp.int32)  # m: "not owned"
  if j > 1:
    r = r.at[:, 1].set(r[:, 0])  # the same row twice in a token
  w = jax.random.normal(ks[1], (n, j))
  w = jnp.where(jax.random.bernoulli(ks[2], 0.2, (n, j)), 0.0, w)  # exact zeros (ReLU'd codes)
  table = jax.random.normal(ks[3], (m, d))
  return r, w, table


def _ffi_and_scan(monkeypatch, fn, *args):
  """fn(*args) compiled with the FFI kernels (checked present) and with the scan."""
  text = jax.jit(fn).lower(*args).as_text()
  assert "sae_jax_cpu_" in text
  fast = jax.jit(fn)(*args)
  monkeypatch.setenv("SAE_JAX_CPU_ROWS", "0")
  scan_fn = jax.jit(lambda *a: fn(*a))
  assert "sae_jax_cpu_" not in scan_fn.lower(*args).as_text()
  return fast, scan_fn(*args)


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * float(jnp.max(jnp.abs(b))))


def test_builds_on_this_machine():
  assert cpu_rows.available()


@pytest.mark.parametrize("n, j, m, d", SHAPES)
def test_gather_sum_matches_scan(monkeypatch, n, j, m, d):
  r, w, table = _case(n, j, m, d)
  w = jnp.where(r < m, w, 0.0)  # the documented contract: not-owned rows carry weight 0
  _close(*_ffi_and_scan(monkeypatch, rows.gather_sum, r, w, table))


@pytest.mark.parametrize("n, j, m, d", SHAPES)
def test_gather_dot_matches_scan(monkeypatch, n, j, m, d):
  r, _, table = _case(n, j, m, d)
  g = jax.random.normal(jax.random.key(9), (n, d))
  fast, ref = _ffi_and_scan(monkeypatch, rows.gather_dot, r, g, table)
  _close(fast, ref)  # not-owned entries read row m - 1 in both forms


@pytest.mark.parametrize("n, j, m, d", SHAPES)
def test_scatter_rows_matches_scan(monkeypatch, n, j, m, d):
  r, w, _ = _case(n, j, m, d)
  src = jax.random.normal(jax.random.key(8), (n, d))
  fast, ref = _ffi_and_scan(monkeypatch, lambda r, w, s: rows.scatter_rows(r, w, s, m,
                                                                           jnp.float32), r, w, src)
  _close(fast, ref)
  # Rows nobody selects are exactly zero; the dropped (not-owned) pairs reach no row.
  used = np.zeros(m, bool)
  used[np.asarray(r)[(np.asarray(r) < m) & (np.asarray(w) != 0)]] = True
  assert np.all(np.asarray(fast)[~used] == 0)


@pytest.mark.parametrize("n, j, m, d", SHAPES)
def test_scatter_cols_is_scatter_rows_transposed(monkeypatch, n, j, m, d):
  r, w, _ = _case(n, j, m, d)
  src = jax.random.normal(jax.random.key(7), (n, d))
  fast, ref = _ffi_and_scan(monkeypatch, lambda r, w, s: rows.scatter_cols(r, w, s, m,
                                                                           jnp.float32), r, w, src)
  assert fast.shape == ref.shape == (d, m)
  _close(fast, ref)


@pytest.mark.parametrize("n, j, m, d", SHAPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_decode_pair_backward_matches_scan(monkeypatch, n, j, m, d, where):
  r, w, table = _case(n, j, m, d)
  split = {"first": 0, "middle": j // 2, "last": j}[where]
  g0 = jax.random.normal(jax.random.key(5), (n, d))
  g1 = jax.random.normal(jax.random.key(6), (n, d))
  fast, ref = _ffi_and_scan(monkeypatch, lambda r, w, a, b, t: rows.decode_pair_backward(
      r, w, a, b, t, split), r, w, g0, g1, table)
  _close(fast[0], ref[0])  # not-owned pairs: 0 in both
  assert np.all(np.asarray(fast[0])[np.asarray(r) >= m] == 0)
  _close(fast[1], ref[1])
  # The columns past split read g1: against g0 alone the dots differ there.
  if split < j:
    alone = rows.gather_dot(r, g0, table)
    assert not np.allclose(np.asarray(fast[0])[:, split:], np.asarray(alone)[:, split:])


def _pair_grads(args):
  values, indices, aux_values, aux_indices, W_dec, g = args

  def pair(v, av, w):
    main, aux = sparse_decode_pair(v, indices, av, aux_indices, w)
    return jnp.sum(main * g) + jnp.sum(jnp.sin(aux))

  def apart(v, av, w):
    main, aux = sparse_decode(v, indices, w), sparse_decode(av, aux_indices, w)
    return jnp.sum(main * g) + jnp.sum(jnp.sin(aux))

  return [jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(values, aux_values, W_dec)
          for f in (pair, apart)]


@pytest.mark.parametrize("ffi", [True, False])
def test_decode_pair_equals_two_decodes(monkeypatch, ffi):
  n, d, m, k, k_aux = 64, 24, 300, 5, 37
  ks = jax.random.split(jax.random.key(11), 6)
  values = jnp.maximum(jax.random.normal(ks[0], (n, k)), 0.0)
  aux_values = jnp.maximum(jax.random.normal(ks[1], (n, k_aux)), 0.0)
  indices = jax.random.randint(ks[2], (n, k), 0, m)
  aux_indices = jax.random.randint(ks[3], (n, k_aux), 0, m // 4)  # AuxK: the dead quarter
  args = (values, indices, aux_values, aux_indices, jax.random.normal(ks[4], (m, d)),
          jax.random.normal(ks[5], (n, d)))
  if not ffi:
    monkeypatch.setenv("SAE_JAX_CPU_ROWS", "0")
  (v1, g1), (v2, g2) = _pair_grads(args)
  _close(v1, v2)
  for name, a, b in zip(["values", "aux_values", "W_dec"], g1, g2):
    assert float(jnp.max(jnp.abs(b))) > 0, name
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * float(jnp.max(jnp.abs(b))),
                               err_msg=name)


def test_bfloat16_table_is_read_as_float32(monkeypatch):
  r, w, table = _case(40, 9, 30, 24)
  w = jnp.where(r < 30, w, 0.0)
  _close(*_ffi_and_scan(monkeypatch, rows.gather_sum, r, w, table.astype(jnp.bfloat16)))


def test_scatter_into_bfloat16_keeps_the_scan():
  r, w, _ = _case(16, 4, 10, 8)
  src = jnp.ones((16, 8))
  fn = jax.jit(lambda r, w, s: rows.scatter_rows(r, w, s, 10, jnp.bfloat16))
  assert "sae_jax_cpu_" not in fn.lower(r, w, src).as_text()


def _aux_loss_grads(args):
  x, W_enc, b_enc, b_dec, W_dec, dead, g = args

  def loss(x, W_enc, b_enc, b_dec, W_dec):
    codes = topk_encode(x, W_enc, b_enc, b_dec, 6, aux_mask=dead, k_aux=37)
    x_hat = sparse_decode(codes.values, codes.indices, W_dec)
    e_hat = sparse_decode(codes.aux_values, codes.aux_indices, W_dec)
    return jnp.sum(x_hat * g) + jnp.sum(jnp.sin(e_hat))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(*args[:5])


def test_encode_decode_gradients_unchanged(monkeypatch):
  n, d, m = 96, 24, 512
  ks = jax.random.split(jax.random.key(4), 7)
  args = (jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (d, m)) / np.sqrt(d),
          0.1 * jax.random.normal(ks[2], (m,)), 0.1 * jax.random.normal(ks[3], (d,)),
          jax.random.normal(ks[4], (m, d)), jax.random.bernoulli(ks[5], 0.4, (m,)),
          jax.random.normal(ks[6], (n, d)))
  v1, g1 = _aux_loss_grads(args)
  monkeypatch.setenv("SAE_JAX_CPU_ROWS", "0")
  v2, g2 = _aux_loss_grads(args)
  _close(v1, v2)
  for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], g1, g2):
    assert float(jnp.max(jnp.abs(b))) > 0, name
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * float(jnp.max(jnp.abs(b))),
                               err_msg=name)
