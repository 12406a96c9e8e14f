"""The Pallas kernels (``kernels="pallas"``) against the XLA path and plain references.

On a CPU the kernels run in Pallas interpret mode; where the default backend is a GPU (run with
``JAX_PLATFORMS=cuda,cpu``) the unsharded tests run the compiled Triton kernels and the sharded
one runs interpreted on the forced CPU devices. Shapes are tiny, odd and not multiples of the
kernels' blocks. The TPU (Mosaic) kernels are also compiled ahead of time for a v5e:2x2 slice
inside shard_map (libtpu gives the TPU target on a CPU host).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_jax.train import init_train_state, make_train_step

import sae_jax as sj
from sae_jax.errors import ConfigError
from sae_jax.kernels import pallas_gpu, pallas_tpu, sparse_decode, sparse_ops, topk_encode

RTOL, ATOL = 1e-5, 1e-5  # float32 sums in a different order
ON_GPU = jax.default_backend() == "gpu"


def _pairs(n, k, m, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  rows = jax.random.randint(ks[0], (n, k), 0, m)
  rows = rows.at[0].set(m - 1).at[1, :2].set(3)  # the last row; a row twice in one token
  return (rows, jax.random.normal(ks[1], (n, k)), jax.random.normal(ks[2], (m, d)),
          jax.random.normal(ks[3], (n, d)))


@pytest.mark.parametrize("module", [pallas_gpu, pallas_tpu], ids=["triton", "mosaic"])
def test_kernels_match_numpy(module):
  n, k, m, d = 19, 37, 29, 45  # K > 32: the Mosaic gathers take K in chunks
  rows, w, table, g = _pairs(n, k, m, d)
  r, wn, tn, gn = map(np.asarray, (rows, w, table, g))
  interpret = not (ON_GPU and module is pallas_gpu)
  out = module.gather_sum(rows, w, table, interpret=interpret)
  np.testing.assert_allclose(out, np.einsum("nk,nkd->nd", wn, tn[r]), rtol=RTOL, atol=ATOL)
  out = module.gather_dot(rows, g, table, interpret=interpret)
  np.testing.assert_allclose(out, np.einsum("nd,nkd->nk", gn, tn[r]), rtol=RTOL, atol=ATOL)
  # The scatter skips row id m (a row another shard owns): a whole token of them here.
  rows, r = rows.at[2].set(m), r.copy()
  r[2] = m
  ref = np.zeros((m + 1, d), np.float32)
  np.add.at(ref, r.reshape(-1), (wn[:, :, None] * gn[:, None, :]).reshape(-1, d))
  ref = ref[:m]
  out = module.scatter_rows(rows, w, g, m, interpret=interpret)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL * np.abs(ref).max())


def _inputs(n, d, m, seed=0, ties=False):
  ks = jax.random.split(jax.random.key(seed), 7)
  W_enc = jax.random.normal(ks[1], (d, m)) / np.sqrt(d)
  b_enc = 0.1 * jax.random.normal(ks[2], (m,))
  if ties:  # groups of equal latents: equal pre-activations, so top-k must break ties
    W_enc = W_enc.at[:, 1::3].set(W_enc[:, ::3][:, :m // 3])
    b_enc = b_enc.at[1::3].set(b_enc[::3][:m // 3])
  return dict(x=jax.random.normal(ks[0], (n, d)), W_enc=W_enc, b_enc=b_enc,
              b_dec=0.1 * jax.random.normal(ks[3], (d,)),
              W_dec=jax.random.normal(ks[4], (m, d)),
              dead=jax.random.bernoulli(ks[5], 0.4, (m,)), g=jax.random.normal(ks[6], (n, d)))


def _forward(kernels, k, k_aux, axis_name, x, W_enc, b_enc, b_dec, W_dec, dead):
  codes = topk_encode(x, W_enc, b_enc, b_dec, k, aux_mask=dead, k_aux=k_aux,
                      axis_name=axis_name, kernels=kernels)
  x_hat = sparse_decode(codes.values, codes.indices, W_dec, axis_name, kernels)
  e_hat = sparse_decode(codes.aux_values, codes.aux_indices, W_dec, axis_name, kernels)
  return x_hat, e_hat


def _loss(kernels, k, k_aux, g, *args):
  x_hat, e_hat = _forward(kernels, k, k_aux, None, *args)
  return jnp.sum(x_hat * g) + 0.5 * jnp.sum(x_hat ** 2) + jnp.sum(jnp.sin(e_hat))


def _assert_close(a, b, name):
  scale = float(jnp.max(jnp.abs(b)))
  assert scale > 0, name
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * scale, err_msg=name)


def test_pallas_values_and_gradients_match_xla_with_ties():
  n, d, m, k, k_aux = 19, 13, 97, 5, 6
  t = _inputs(n, d, m, seed=1, ties=True)
  args = (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], t["W_dec"], t["dead"])
  results = {}
  for kernels in ("xla", "pallas"):
    f = jax.jit(jax.value_and_grad(functools.partial(_loss, kernels, k, k_aux, t["g"]),
                                   argnums=(0, 1, 2, 3, 4)))
    results[kernels] = f(*args)
  (v1, g1), (v2, g2) = results["pallas"], results["xla"]
  np.testing.assert_allclose(v1, v2, rtol=RTOL)
  for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], g1, g2):
    _assert_close(a, b, name)


def test_sharded_pallas_matches_single_device_xla(monkeypatch):
  """Latents over 4 CPU devices through shard_map (each shard: its own rows, global ids), with
  the Mosaic kernels interpreted (the unsharded test above covers the Triton ones)."""
  monkeypatch.setitem(sparse_ops.INTERPRETED, "module", pallas_tpu)
  n, d, m, k, k_aux = 8, 12, 100, 5, 6
  t = _inputs(n, d, m, seed=4)
  mesh = Mesh(np.array(jax.devices("cpu")[:4]), ("model",))

  def local(x, W_enc, b_enc, b_dec, W_dec, dead):
    def fwd(W_enc, b_enc, b_dec, W_dec):
      return _forward("pallas", k, k_aux, "model", x, W_enc, b_enc, b_dec, W_dec, dead)

    (x_hat, e_hat), pullback = jax.vjp(fwd, W_enc, b_enc, b_dec, W_dec)
    x_hat, e_hat = jax.lax.psum(x_hat, "model"), jax.lax.psum(e_hat, "model")
    gW, gb, gbd, gWd = pullback((t["g"], jnp.cos(e_hat)))
    val = jnp.sum(x_hat * t["g"]) + jnp.sum(jnp.sin(e_hat))
    return val, gW, gb, jax.lax.psum(gbd, "model"), gWd

  lat = P("model")
  f = jax.jit(jax.shard_map(
      local, mesh=mesh, check_vma=False,
      in_specs=(P(), P(None, "model"), lat, P(), P("model", None), lat),
      out_specs=(P(), P(None, "model"), lat, P(), P("model", None))))
  args = [jax.device_put(t[name], NamedSharding(mesh, P()))
          for name in ("x", "W_enc", "b_enc", "b_dec", "W_dec", "dead")]
  val_s, *grads_s = f(*args)

  def loss(W_enc, b_enc, b_dec, W_dec):
    x_hat, e_hat = _forward("xla", k, k_aux, None, args[0], W_enc, b_enc, b_dec, W_dec, args[5])
    return jnp.sum(x_hat * t["g"]) + jnp.sum(jnp.sin(e_hat))

  val_1, grads_1 = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args[1:5])
  np.testing.assert_allclose(val_s, val_1, rtol=RTOL)
  for name, a, b in zip(["W_enc", "b_enc", "b_dec", "W_dec"], grads_s, grads_1):
    _assert_close(a, b, name)


def test_unknown_kernels_is_one_line_error():
  with pytest.raises(ConfigError, match="kernels='triton'"):
    sparse_ops.check_kernels("triton")
  with pytest.raises(ConfigError, match="kernels='triton'"):
    sj.TrainConfig(kernels="triton")


def test_auto_kernels_are_pallas_on_a_gpu_and_xla_elsewhere():
  assert sparse_ops.resolve_kernels("auto", "gpu") == "pallas"
  assert sparse_ops.resolve_kernels("auto", "tpu") == "xla"
  assert sparse_ops.resolve_kernels("pallas", "cpu") == "pallas"
  assert sj.TrainConfig().kernels == "auto"
  cfg = sj.SAEConfig(d_in=8, d_sae=16, k=2)
  mesh = sj.make_mesh(devices=jax.devices("cpu")[:1])  # a CPU mesh on any machine
  assert make_train_step(cfg, sj.TrainConfig(batch_size=4), mesh).tcfg.kernels == "xla"
  with pytest.raises(ConfigError, match="resolve 'auto' first"):
    sparse_ops.check_kernels("auto")


def test_train_step_uses_the_kernels_it_is_configured_with():
  """TrainConfig.kernels reaches every sparse op of the sharded step (with AuxK columns); the
  default step has none of the Pallas kernels. Traced only: the numbers are the tests above."""
  cfg = sj.SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4)
  mesh = sj.make_mesh(sj.MeshConfig(data=2, model=4), devices=jax.devices("cpu")[:8])
  x = jax.random.normal(jax.random.key(0), (32, 16))
  # The TPU branch of each op's per-platform choice (the Triton and interpreted ones are there
  # too, under the names without _tpu).
  names = ("sae_gather_sum_tpu", "sae_gather_dot_tpu", "sae_scatter_rows_tpu")
  for kernels in ("xla", "pallas"):
    tcfg = sj.TrainConfig(batch_size=32, aux_k=8, kernels=kernels)
    state = init_train_state(cfg, tcfg, mesh, x)
    text = str(make_train_step(cfg, tcfg, mesh).jitted(8).trace(state, x).jaxpr)
    found = re.findall(r"name=(sae_\w+)", text)
    counts = [found.count(n) for n in names]
    # pallas: decode (main, AuxK) forward and backward, and the encoder's weight gradient.
    assert counts == ([2, 2, 3] if kernels == "pallas" else [0, 0, 0]), (kernels, counts)


def _tpu_mesh():
  # Another process may hold libtpu (we only compile): let this one load it too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
  except Exception as e:  # noqa: BLE001 (no libtpu: the `tpu` extra is not installed)
    pytest.skip(f"no TPU compiler here: {str(e).splitlines()[0][:100]}")
  return Mesh(np.array(devices).reshape(2, 2), ("data", "model"))


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_step_kernels_compile_for_tpu(param_dtype):
  """The sparse forward and backward with kernels="pallas", sharded over a v5e:2x2 slice
  (tokens over "data", latents over "model"), compile to Mosaic kernels ahead of time."""
  mesh = _tpu_mesh()
  n, d, m, k, k_aux = 64, 256, 1024, 32, 64  # AuxK wider than a K chunk

  def local(x, W_enc, b_enc, b_dec, W_dec, dead, g):
    def fwd(W_enc, b_enc, W_dec):
      return _forward("pallas", k, k_aux, "model", x, W_enc, b_enc, b_dec, W_dec, dead)

    (x_hat, e_hat), pullback = jax.vjp(fwd, W_enc, b_enc, W_dec)
    x_hat = jax.lax.psum(x_hat, "model")
    return pullback((g, jax.lax.psum(e_hat, "model")))

  lat, tok = P("model"), P("data")
  f = jax.shard_map(local, mesh=mesh, check_vma=False,
                    in_specs=(tok, P(None, "model"), lat, P(), P("model", None), lat, tok),
                    out_specs=(P(None, "model"), lat, P("model", None)))
  specs = [((n, d), tok), ((d, m), P(None, "model")), ((m,), lat), ((d,), P()),
           ((m, d), P("model", None)), ((m,), lat), ((n, d), tok)]
  dtypes = [jnp.float32, param_dtype, jnp.float32, jnp.float32, param_dtype, bool, jnp.float32]
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
          for (shape, spec), dtype in zip(specs, dtypes)]
  compiled = jax.jit(f).lower(*args).compile()
  text = compiled.as_text()
  for name in ("sae_gather_sum_tpu", "sae_gather_dot_tpu", "sae_scatter_rows_tpu"):
    assert name in text, name
  mem = compiled.memory_analysis()
  assert mem.temp_size_in_bytes < 64 << 20
