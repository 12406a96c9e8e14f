"""Each kernel against a naive dense reference: values, indices and every gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sae_jax as sj
from sae_jax.kernels import (cpu_topk, kth_largest_nonneg, rows, select_topk, sparse_decode,
                             topk, topk_encode)
from sae_jax.kernels.topk import _block_top_k

RTOL, ATOL = 1e-5, 1e-5  # fixed up front: float32 sums in a different order


def _inputs(n, d, m, seed=0, dead_share=0.3):
  ks = jax.random.split(jax.random.key(seed), 7)
  return dict(
      x=jax.random.normal(ks[0], (n, d)),
      W_enc=jax.random.normal(ks[1], (d, m)) / np.sqrt(d),
      b_enc=0.1 * jax.random.normal(ks[2], (m,)),
      b_dec=0.1 * jax.random.normal(ks[3], (d,)),
      W_dec=jax.random.normal(ks[4], (m, d)),
      dead=jax.random.bernoulli(ks[5], dead_share, (m,)),
      g=jax.random.normal(ks[6], (n, d)),
  )


def _dense_reference(x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux):
  """Dense masks, plain autodiff: the definition the kernels must match."""
  n = x.shape[0]
  pre = (x - b_dec) @ W_enc + b_enc
  _, idx = jax.lax.top_k(pre, k)
  mask = jnp.zeros_like(pre).at[jnp.arange(n)[:, None], idx].set(1.0)
  x_hat = (jax.nn.relu(pre) * jax.lax.stop_gradient(mask)) @ W_dec
  if not k_aux:
    return x_hat, None
  _, aidx = jax.lax.top_k(jnp.where(dead[None], pre, -jnp.inf), k_aux)
  amask = jnp.zeros_like(pre).at[jnp.arange(n)[:, None], aidx].set(1.0) * dead[None]
  e_hat = (jax.nn.relu(pre) * jax.lax.stop_gradient(amask)) @ W_dec
  return x_hat, e_hat


def _kernel_forward(x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux, axis_name=None):
  codes = topk_encode(x, W_enc, b_enc, b_dec, k, aux_mask=dead, k_aux=k_aux, axis_name=axis_name)
  x_hat = sparse_decode(codes.values, codes.indices, W_dec, axis_name)
  e_hat = (sparse_decode(codes.aux_values, codes.aux_indices, W_dec, axis_name)
           if k_aux else None)
  return x_hat, e_hat


def _loss(fwd, g, x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux):
  x_hat, e_hat = fwd(x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux)
  out = jnp.sum(x_hat * g) + 0.5 * jnp.sum(x_hat ** 2)
  if e_hat is not None:
    out = out + jnp.sum(jnp.sin(e_hat))
  return out


@pytest.mark.parametrize("n, d, m, k, k_aux", [
    (37, 13, 97, 5, 0),      # small M: plain lax.top_k path
    (37, 13, 336, 5, 7),     # block-max selection path, with AuxK
    (64, 24, 1024, 8, 16),
])
def test_encode_decode_values_and_gradients_match_dense(n, d, m, k, k_aux):
  t = _inputs(n, d, m)
  args = (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], t["W_dec"], t["dead"])
  fast, ref = (jax.jit(jax.value_and_grad(functools.partial(_loss, f, t["g"]),
                                          argnums=(0, 1, 2, 3, 4)), static_argnums=(6, 7))
               for f in (_kernel_forward, _dense_reference))
  (v1, g1), (v2, g2) = fast(*args, k, k_aux), ref(*args, k, k_aux)
  np.testing.assert_allclose(v1, v2, rtol=RTOL, atol=ATOL * abs(float(v2)))
  for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], g1, g2):
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0, name
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * scale, err_msg=name)


def test_codes_match_numpy_topk():
  t = _inputs(29, 11, 512, seed=3)
  codes = topk_encode(t["x"], t["W_enc"], t["b_enc"], t["b_dec"], 6)
  pre = (np.asarray(t["x"]) - np.asarray(t["b_dec"])) @ np.asarray(t["W_enc"]) + np.asarray(
      t["b_enc"])
  ref_idx = np.argsort(-pre, axis=1)[:, :6]
  np.testing.assert_array_equal(np.asarray(codes.indices), ref_idx)
  np.testing.assert_allclose(codes.values, np.maximum(np.take_along_axis(pre, ref_idx, 1), 0),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m, k", [(2048, 16), (97, 5), (336, 5)])
def test_xla_block_top_k_is_exact(m, k):
  pre = jax.random.normal(jax.random.key(5), (50, m))
  for fn in (_block_top_k, select_topk):
    vals, idx = fn(pre, k)
    ref_vals, ref_idx = jax.lax.top_k(pre, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(vals, ref_vals)


def test_gradients_without_the_ffi_top_k(monkeypatch):
  """The pure-XLA fallback (no C++ compiler, GPU, TPU) gives the same codes and gradients."""
  monkeypatch.setattr(cpu_topk, "available", lambda: False)
  test_encode_decode_values_and_gradients_match_dense(37, 13, 336, 5, 7)


def test_gradients_without_the_ffi_row_kernels(monkeypatch):
  """The scan form of the row operations (SAE_JAX_CPU_ROWS=0) gives the same gradients."""
  monkeypatch.setenv("SAE_JAX_CPU_ROWS", "0")
  test_encode_decode_values_and_gradients_match_dense(37, 13, 336, 5, 7)


def test_auxk_gradient_reaches_encoder_of_dead_latents_only():
  t = _inputs(41, 13, 336, seed=1)
  dead = t["dead"]

  def aux_only(W_enc):
    codes = topk_encode(t["x"], W_enc, t["b_enc"], t["b_dec"], 5, aux_mask=dead, k_aux=9)
    return jnp.sum(sparse_decode(codes.aux_values, codes.aux_indices, t["W_dec"]) ** 2)

  def aux_only_dense(W_enc):
    _, e_hat = _dense_reference(t["x"], W_enc, t["b_enc"], t["b_dec"], t["W_dec"], dead, 5, 9)
    return jnp.sum(e_hat ** 2)

  g = np.asarray(jax.grad(aux_only)(t["W_enc"]))
  ref = np.asarray(jax.grad(aux_only_dense)(t["W_enc"]))
  np.testing.assert_allclose(g, ref, rtol=RTOL, atol=ATOL * np.abs(ref).max())
  # Exactly the dead latents some token picks among its 9 largest dead, positive, pre-acts.
  pre = (np.asarray(t["x"]) - np.asarray(t["b_dec"])) @ np.asarray(t["W_enc"]) + np.asarray(
      t["b_enc"])
  dead_pre = np.where(np.asarray(dead)[None], pre, -np.inf)
  top = np.argsort(-dead_pre, axis=1)[:, :9]
  picked = np.zeros(pre.shape[1], bool)
  picked[top[np.take_along_axis(dead_pre, top, 1) > 0]] = True
  assert picked.any() and not picked.all()
  np.testing.assert_array_equal(np.abs(g).sum(0) > 0, picked)


def test_sparse_decode_matches_dense_and_gradients():
  ks = jax.random.split(jax.random.key(2), 4)
  vals = jax.random.normal(ks[0], (23, 7))
  idx = jax.random.randint(ks[1], (23, 7), 0, 101)
  W = jax.random.normal(ks[2], (101, 17))
  g = jax.random.normal(ks[3], (23, 17))

  def dense(v, W):
    a = jnp.zeros((23, 101)).at[jnp.arange(23)[:, None], idx].add(v)
    return jnp.sum((a @ W) * g)

  def fast(v, W):
    return jnp.sum(sparse_decode(v, idx, W) * g)

  np.testing.assert_allclose(fast(vals, W), dense(vals, W), rtol=1e-5)
  for a, b in zip(jax.grad(fast, (0, 1))(vals, W), jax.grad(dense, (0, 1))(vals, W)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [2, 4])
def test_sharded_kernels_equal_single_device(model):
  n, d, m, k, k_aux = 16, 12, 1536, 5, 6
  t = _inputs(n, d, m, seed=4)
  mesh = sj.make_mesh(sj.MeshConfig(data=8 // model, model=model))

  def loss(W_enc, b_enc, b_dec, W_dec, x, dead):
    x_hat, e_hat = _kernel_forward(x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux)
    return jnp.sum(x_hat * t["g"]) + jnp.sum(jnp.cos(e_hat))

  def sharded(W_enc, b_enc, b_dec, W_dec, x, dead):
    # The train step's pattern: each shard differentiates its partial reconstruction with
    # jax.vjp against the cotangent of the global (psum-ed) loss; no autodiff through psum.
    def local(W_enc, b_enc, b_dec, W_dec, x):
      return _kernel_forward(x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux, "model")

    (x_hat, e_hat), pullback = jax.vjp(local, W_enc, b_enc, b_dec, W_dec, x)
    x_hat, e_hat = jax.lax.psum(x_hat, "model"), jax.lax.psum(e_hat, "model")
    val = jnp.sum(x_hat * t["g"]) + jnp.sum(jnp.cos(e_hat))
    gW, gb, gbd, gWd, gx = pullback((t["g"], -jnp.sin(e_hat)))
    # Latent-sharded slices are complete; the shared b_dec and x gradients are partial sums.
    return val, gW, gb, jax.lax.psum(gbd, "model"), gWd, jax.lax.psum(gx, "model")

  lat = P("model")
  f = jax.jit(jax.shard_map(
      sharded, mesh=mesh, check_vma=False,
      in_specs=(P(None, "model"), lat, P(), P("model", None), P(), lat),
      out_specs=(P(), P(None, "model"), lat, P(), P("model", None), P())))
  args = (t["W_enc"], t["b_enc"], t["b_dec"], t["W_dec"], t["x"], t["dead"])
  val_s, *grads_s = f(*args)
  val_1, grads_1 = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
  np.testing.assert_allclose(val_s, val_1, rtol=1e-5)
  for name, a, b in zip(["W_enc", "b_enc", "b_dec", "W_dec", "x"], grads_s, grads_1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                               err_msg=name)


def test_kth_largest_nonneg_exact_and_sharded():
  v = jnp.abs(jax.random.normal(jax.random.key(7), (64, 9)))
  flat = np.sort(np.asarray(v).ravel())[::-1]
  for kth in (1, 17, 300, 576):
    assert float(kth_largest_nonneg(v, kth)) == flat[kth - 1]
  mesh = sj.make_mesh(sj.MeshConfig(data=8, model=1))
  f = jax.jit(jax.shard_map(lambda a: kth_largest_nonneg(a, 100, "data"), mesh=mesh,
                            in_specs=P("data"), out_specs=P(), check_vma=False))
  assert float(f(v)) == flat[99]


def test_accelerator_chunking_selects_the_same(monkeypatch):
  """The GPU/TPU chunk policy (a few large chunks) selects what the CPU policy selects."""
  inp = _inputs(301, 16, 512, seed=3)  # 301 rows: padded last chunk under both policies
  xc = inp["x"] - inp["b_dec"]
  monkeypatch.setitem(topk.CHUNK_BYTES, "gpu", 128 * 512 * 4)  # 128-row chunks
  args = (xc, inp["W_enc"], inp["b_enc"], inp["dead"], 6, 9, "float32")
  cpu = topk._encode_select(*args, platform="cpu")
  acc = topk._encode_select(*args, platform="gpu")
  assert topk._row_chunk(301, 512, "gpu") == 128 and topk._row_chunk(301, 512, "cpu") == 301
  for a, b in zip(cpu, acc):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("group_bytes", [1, 3 * 37 * 13 * 4, 1 << 30])  # 1, 3 (padded), all
def test_accelerator_row_ops_equal_the_cpu_form(monkeypatch, group_bytes):
  """The grouped GPU/TPU forms of the row gathers and scatters equal the CPU's column scans."""
  monkeypatch.setitem(rows.GROUP_BYTES, "gpu", group_bytes)
  n, d, m, j = 37, 13, 50, 8
  ks = jax.random.split(jax.random.key(7), 4)
  ids = jax.random.randint(ks[0], (n, j), 0, m + 1)  # m: "not owned"
  w = jax.random.normal(ks[1], (n, j)) * (ids < m)
  src, table = jax.random.normal(ks[2], (n, d)), jax.random.normal(ks[3], (m, d))
  for platform in ("cpu", "gpu"):
    got = (rows._scatter_rows(ids, w, src, m, jnp.float32, platform),
           rows._gather_sum(ids, w, table, platform), rows._gather_dot(ids, src, table, platform))
    safe = jnp.minimum(ids, m - 1)
    want = (jnp.zeros((m + 1, d)).at[ids].add(w[..., None] * src[:, None])[:m],
            jnp.einsum("nj,njd->nd", w, table[safe]), jnp.einsum("nd,njd->nj", src, table[safe]))
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
