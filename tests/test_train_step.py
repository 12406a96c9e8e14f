"""The sharded train step: equality with one device, invariants, AuxK, NaN handling, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.errors import ConfigError, DataError
from sae_jax.train import init_train_state, make_train_step
from sae_jax.train.step import MIN_AUX_BUCKET
from sae_jax.train.state import DATA_FIT_POWER

D, M, N = 16, 256, 64


def _data(n_batches, seed=0):
  return jax.random.normal(jax.random.key(seed), (n_batches, N, D)) * jnp.linspace(0.5, 2, D)


def _run(arch, mesh, steps=4, xs=None, **tkw):
  cfg = sj.SAEConfig(architecture=arch, d_in=D, d_sae=M, k=4)
  tcfg = sj.TrainConfig(batch_size=N, aux_k=8, dead_tokens=N, **tkw,
                        optim=sj.OptimConfig(lr=3e-3, warmup_steps=2))
  xs = _data(steps) if xs is None else xs
  state = init_train_state(cfg, tcfg, mesh, xs[0])
  step = make_train_step(cfg, tcfg, mesh)
  history = []
  for x in xs:
    state, metrics = step(state, x)
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_sharded_2x4_step_equals_single_device(arch):
  one = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  grid = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  s1, h1 = _run(arch, one)
  s8, h8 = _run(arch, grid)
  if arch in ("topk", "batchtopk"):
    assert h1[-1]["aux_loss"] > 0  # latents went dead after one step: AuxK ran sharded too
  for name in s1.params:
    a, b = np.asarray(s1.params[name]), np.asarray(s8.params[name])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=name)
  np.testing.assert_array_equal(s1.tokens_since_fired, s8.tokens_since_fired)
  for m1, m8 in zip(h1, h8):
    for k in m1:
      assert m8[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
  assert s8.params["W_enc"].sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_decoder_rows_stay_unit_norm_and_loss_falls():
  # A relative fall from the first step: measured from the tied init (unit encoder) it was set
  # for; the linear default starts lower on this Gaussian data (0.32, not compressible much
  # further in 30 steps). Learning per token with the defaults: tests/test_quality.py.
  mesh = sj.make_mesh(sj.MeshConfig(data=8, model=1))
  state, hist = _run("topk", mesh, steps=30, encoder_init="tied")
  np.testing.assert_allclose(np.linalg.norm(state.params["W_dec"], axis=1), 1.0, rtol=1e-5)
  assert hist[-1]["fvu"] < 0.8 * hist[0]["fvu"]
  assert all(h["l0"] == pytest.approx(4.0) for h in hist)


def test_relu_decoder_rows_are_free():
  mesh = sj.make_mesh(sj.MeshConfig(data=8, model=1))
  state, _ = _run("relu", mesh, steps=5)
  norms = np.linalg.norm(state.params["W_dec"], axis=1)
  assert not np.allclose(norms, 0.1)


def test_auxk_trains_dead_encoder_columns():
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  cfg = sj.SAEConfig(architecture="topk", d_in=D, d_sae=M, k=4)
  tcfg = sj.TrainConfig(batch_size=N, aux_k=8, optim=sj.OptimConfig(lr=1e-2, warmup_steps=1))
  x = _data(1)[0]
  fresh = init_train_state(cfg, tcfg, mesh, x)
  step = make_train_step(cfg, tcfg, mesh)
  # Mark half of the latents dead; among them, those that fire in the main top-k are revived,
  # the others can only learn through AuxK.
  dead = jnp.arange(M) < M // 2
  before = np.asarray(fresh.params["W_enc"])
  p = {k: np.array(v, np.float64) for k, v in fresh.params.items()}  # the step donates them
  state = fresh.replace(tokens_since_fired=jnp.where(dead, tcfg.dead_tokens, 0))
  main_codes = sj.SAE(cfg, state.params, state.buffers).encode(x)[1]
  state, metrics = step(state, x)
  assert float(metrics["aux_loss"]) > 0
  changed = np.abs(np.asarray(state.params["W_enc"]) - before).sum(0) > 0
  in_main = np.zeros(M, bool)
  in_main[np.asarray(main_codes).ravel()] = True
  only_aux = np.asarray(dead) & ~in_main
  # Reference: a column outside the main top-k moves iff some token picks it among the
  # aux_k=8 largest dead pre-activations, and that pre-activation is positive.
  pre = (np.asarray(x, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
  dead_pre = np.where(np.asarray(dead)[None], pre, -np.inf)
  top = np.argsort(-dead_pre, axis=1)[:, :8]
  picked = np.zeros(M, bool)
  picked[top[np.take_along_axis(dead_pre, top, 1) > 0]] = True
  assert picked[only_aux].any()
  np.testing.assert_array_equal(changed[only_aux], picked[only_aux])
  # Without AuxK those columns get no gradient at all.
  step0 = make_train_step(cfg, tcfg.replace(aux_k=0), mesh)
  state0 = init_train_state(cfg, tcfg, mesh, x).replace(
      tokens_since_fired=jnp.where(dead, tcfg.dead_tokens, 0))
  state0, _ = step0(state0, x)
  changed0 = np.abs(np.asarray(state0.params["W_enc"]) - before).sum(0) > 0
  assert not changed0[only_aux].any()


def test_nan_batch_is_skipped_and_counted():
  mesh = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  cfg = sj.SAEConfig(architecture="topk", d_in=D, d_sae=M, k=4)
  tcfg = sj.TrainConfig(batch_size=N)
  x = _data(1)[0]
  state = init_train_state(cfg, tcfg, mesh, x)
  step = make_train_step(cfg, tcfg, mesh)
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, x.at[3, 5].set(jnp.nan))
  assert int(state.nan_batches) == 1 and float(metrics["skipped"]) == 1.0
  assert np.isnan(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, state.replace(nan_batches=before.nan_batches))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  state, metrics = step(state, x)
  assert int(state.step) == 1 and float(metrics["skipped"]) == 0.0


def test_step_rejects_indivisible_batch_and_latents():
  mesh = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  with pytest.raises(ConfigError, match="batch_size=63"):
    make_train_step(sj.SAEConfig(d_in=D, d_sae=M, k=4), sj.TrainConfig(batch_size=63), mesh)
  with pytest.raises(ConfigError, match="d_sae=250"):
    make_train_step(sj.SAEConfig(d_in=D, d_sae=250, k=4), sj.TrainConfig(batch_size=64), mesh)


def test_train_sae_errors_are_one_line():
  cfg = sj.SAEConfig(d_in=D, d_sae=M, k=4)
  with pytest.raises(DataError, match=f"width {D + 1} but the SAE has d_in={D}"):
    sj.train_sae(np.zeros((128, D + 1), np.float32), cfg, sj.TrainConfig(batch_size=N))
  x = np.array(_data(4).reshape(-1, D))
  x[::N] = np.nan  # every batch of 64 rows holds one NaN row
  with pytest.raises(DataError, match="max_nan_batches=2"):
    sj.train_sae(x, cfg, sj.TrainConfig(batch_size=N, total_tokens=N * 8, seed=1,
                                        run=sj.RunConfig(max_nan_batches=2, log_every=2)))
  with pytest.raises(DataError, match="first batch contains NaN"):
    sj.train_sae(x, cfg, sj.TrainConfig(batch_size=N, run=sj.RunConfig(max_nan_batches=2)))


def _planted(n, d, n_feat, active, seed):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n_feat, d))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  idx = np.stack([rng.choice(n_feat, active, replace=False) for _ in range(n)])
  coef = rng.uniform(0.5, 1.5, size=(n, active))
  x = np.einsum("nk,nkd->nd", coef, feats[idx]) + 0.01 * rng.normal(size=(n, d))
  return x.astype(np.float32), feats


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_recovers_planted_sparse_features(arch):
  """A real learning test: 128 planted directions in R^48, 4 active per token."""
  x, feats = _planted(60_000, 48, 128, 4, seed=0)
  cfg = sj.SAEConfig(architecture=arch, d_in=48, d_sae=512, k=4)
  tcfg = sj.TrainConfig(batch_size=1024, total_tokens=1024 * 1500,
                        optim=sj.OptimConfig(lr=3e-3, warmup_steps=50),
                        run=sj.RunConfig(log_every=500))
  # One device: this is a learning test (the sharded step's equality is tested above), and the
  # suite's eight forced devices would split each tiny step eight ways on two cores.
  one = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  sae = sj.train_sae(x, cfg, tcfg, mesh=one)
  w = np.asarray(sae.params["W_dec"])
  best = (feats @ w.T).max(axis=1)
  assert np.mean(best > 0.9) > 0.9, np.sort(best)[:10]
  # Far better than the best linear reconstruction with as many (k) dimensions: PCA.
  centred = x - x.mean(0)
  eig = np.linalg.eigvalsh(centred.T @ centred)[::-1]
  pca_fvu = eig[4:].sum() / eig.sum()
  assert sae.metadata["final_metrics"]["fvu"] < 0.25 * pca_fvu


def test_auxk_width_follows_the_dead_count_with_identical_results():
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  cfg = sj.SAEConfig(architecture="topk", d_in=D, d_sae=M, k=4)
  tcfg = sj.TrainConfig(batch_size=N, aux_k=64, optim=sj.OptimConfig(lr=1e-2, warmup_steps=1))
  x = _data(1)[0]
  step = make_train_step(cfg, tcfg, mesh)
  fresh = lambda n_dead: init_train_state(cfg, tcfg, mesh, x).replace(
      tokens_since_fired=jnp.where(jnp.arange(M) < n_dead, tcfg.dead_tokens, 0))
  assert step.aux_columns(fresh(0)) == 0
  # The power of two holding the dead latents, at least MIN_AUX_BUCKET, at most k_aux.
  assert MIN_AUX_BUCKET == 32
  assert step.aux_columns(fresh(5)) == 32
  assert step.aux_columns(fresh(40)) == 64
  assert step.aux_columns(fresh(200)) == 64
  narrow, m1 = step.jitted(8)(fresh(5), x)
  wide, m2 = step.jitted(64)(fresh(5), x)
  assert float(m1["aux_loss"]) > 0
  assert float(m1["aux_loss"]) == pytest.approx(float(m2["aux_loss"]), rel=1e-6)
  for k in narrow.params:
    np.testing.assert_allclose(narrow.params[k], wide.params[k], rtol=1e-6, atol=1e-7)


def _dots(jaxpr):
  """Every dot_general equation of a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _dots(inner)


def test_dense_auxk_gradient_matmuls_run_in_the_compute_dtype():
  """At compute_dtype bfloat16 the dense AuxK's backward matmuls take bfloat16 operands (plain
  autodiff multiplied the float32 cotangent in float32: TF32 matmuls on a GPU), and its
  gradients stay those of the float32 computation to bfloat16 rounding."""
  from sae_jax.kernels.auxk import dense_auxk_decode
  d, m, n = 16, 64, 32
  ks = jax.random.split(jax.random.key(3), 5)
  w_enc = jax.random.normal(ks[0], (d, m)) / 4
  w_dec = jax.random.normal(ks[1], (m, d)) / 4
  b_enc, b_dec = jax.random.normal(ks[2], (m,)) / 10, jax.random.normal(ks[3], (d,)) / 10
  x = jax.random.normal(ks[4], (n, d))
  dead = jnp.arange(m) % 3 == 0

  def grads(cdt):
    loss = lambda we, be, bd, wd: jnp.sum(
        dense_auxk_decode(x, we, be, bd, wd, dead, 4, 32, cdt) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2, 3)), loss

  g16, loss16 = grads("bfloat16")
  dots = list(_dots(jax.make_jaxpr(g16)(w_enc, b_enc, b_dec, w_dec).jaxpr))
  big = [e for e in dots if all(v.aval.ndim == 2 for v in e.invars)]
  assert len(big) >= 5  # two forward matmuls, three backward ones
  assert all(v.aval.dtype == jnp.bfloat16 for e in big for v in e.invars), [
      [str(v.aval) for v in e.invars] for e in big]
  got = g16(w_enc, b_enc, b_dec, w_dec)
  want = grads("float32")[0](w_enc, b_enc, b_dec, w_dec)
  for a, b in zip(got, want):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=0.03 * scale)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_dense_auxk_equals_sparse_auxk(arch):
  """AuxK over a dense block of dead latents: the sparse path's loss and gradients (to float
  tolerance, fixed up front: the sums run in another order)."""
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  cfg = sj.SAEConfig(architecture=arch, d_in=D, d_sae=M, k=4)
  x = _data(1)[0]
  out = {}
  for impl in ("sparse", "dense"):
    tcfg = sj.TrainConfig(batch_size=N, aux_k=8, auxk_impl=impl,
                          optim=sj.OptimConfig(lr=1e-2, warmup_steps=1))
    step = make_train_step(cfg, tcfg, mesh)
    # 37 dead latents: a capacity of 64 with 27 padded columns that must never be picked.
    state = init_train_state(cfg, tcfg, mesh, x).replace(
        tokens_since_fired=jnp.where(jnp.arange(M) % 7 == 3, tcfg.dead_tokens, 0))
    assert step.aux_plan(state) == (8, 64 if impl == "dense" else 0)
    out[impl] = step(state, x)
  (s_state, s_m), (d_state, d_m) = out["sparse"], out["dense"]
  assert float(s_m["aux_loss"]) > 0
  assert float(d_m["aux_loss"]) == pytest.approx(float(s_m["aux_loss"]), rel=1e-5)
  for k in s_state.params:
    np.testing.assert_allclose(d_state.params[k], s_state.params[k], rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="auxk_impl='fast'"):
    sj.TrainConfig(auxk_impl="fast")


@pytest.mark.parametrize("shape,kernels", [((1, 1), "xla"), ((2, 4), "xla"), ((8, 1), "xla"),
                                           ((2, 2), "pallas")])
def test_blockwise_update_equals_the_whole_array_update(shape, kernels):
  # The same objective and update written by hand and applied block by block over the latents:
  # equal to autodiff's whole-array update up to float rounding (tolerance as the sharded
  # step's), over steps where latents are dead (AuxK), and a NaN batch (skipped).
  data, model = shape
  mesh = sj.make_mesh(sj.MeshConfig(data=data, model=model), devices=jax.devices()[:data * model])
  xs = _data(5, seed=3)
  xs = xs.at[2, 5, 3].set(jnp.nan)
  out = {b: _run("topk", mesh, xs=xs, kernels=kernels, update_blocks=b) for b in (1, 4)}
  (s1, h1), (s4, h4) = out[1], out[4]
  assert h1[-1]["aux_loss"] > 0 and h1[2]["skipped"] == 1.0
  assert int(s4.nan_batches) == 1 and int(s4.step) == 4
  for name in s1.params:
    a, b = np.asarray(s1.params[name]), np.asarray(s4.params[name])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=name)
  for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s4.opt_state)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(np.abs(a).max(), 1e-30))
  np.testing.assert_array_equal(s1.tokens_since_fired, s4.tokens_since_fired)
  for m1, m4 in zip(h1, h4):
    for k in m1:
      assert m4[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6, nan_ok=True), k
  assert s4.params["W_enc"].sharding == s1.params["W_enc"].sharding


def test_blockwise_update_errors_are_one_line():
  mesh = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  with pytest.raises(ConfigError, match=r"update_blocks=3 must divide the latents on each "
                                        r"chip \(64 = d_sae 256 / model axis 4\)"):
    make_train_step(sj.SAEConfig(d_in=D, d_sae=M, k=4),
                    sj.TrainConfig(batch_size=N, update_blocks=3), mesh)
  with pytest.raises(ConfigError, match="update_blocks=2 needs architecture 'topk'"):
    make_train_step(sj.SAEConfig(architecture="relu", d_in=D, d_sae=M),
                    sj.TrainConfig(batch_size=N, update_blocks=2), mesh)
  with pytest.raises(ConfigError, match="update_blocks=0 must be an int >= 1"):
    sj.TrainConfig(update_blocks=0)


@pytest.mark.parametrize("blocks", [1, 4])
def test_bfloat16_state_keeps_its_dtypes_across_steps(blocks):
  # A float32 projected decoder gradient used to promote Adam's bfloat16 first moment after
  # step 1: a new state signature (a recompile, a checkpoint of other dtypes than the config's).
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  cfg = sj.SAEConfig(d_in=D, d_sae=M, k=4, param_dtype="bfloat16", compute_dtype="bfloat16")
  tcfg = sj.TrainConfig(batch_size=N, update_blocks=blocks)
  xs = _data(2)
  state = init_train_state(cfg, tcfg, mesh, xs[0])
  before = jax.tree.map(lambda a: a.dtype, state)
  step = make_train_step(cfg, tcfg, mesh)
  for x in xs:
    state, _ = step(state, x)
  assert jax.tree.map(lambda a: a.dtype, state) == before
  assert len(step._compiled) == 1


def _np_first_batch_fvu(x, w_enc, w_dec, b_dec, k):
  """FVU of the TopK reconstruction of x [N, D] at encoder w_enc [D, M] (numpy, b_enc = 0)."""
  pre = np.maximum((x - b_dec) @ w_enc, 0.0)
  idx = np.argsort(-pre, axis=1)[:, :k]
  acts = np.zeros_like(pre)
  np.put_along_axis(acts, idx, np.take_along_axis(pre, idx, axis=1), axis=1)
  x_hat = acts @ w_dec + b_dec
  return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_linear_fit_encoder_scale_minimises_the_first_batch_error():
  # The fitted init is the linear draw times one scalar c, fitted on the sharded 2x4 mesh; in
  # numpy, c gives a lower first-batch FVU than 0.9 c or 1.1 c. The data is scaled by 3 so
  # that c is far from 1 (the drawn scale is not already the fit).
  x = np.asarray(_data(1)[0], np.float64) * 3.0
  cfg = sj.SAEConfig(d_in=D, d_sae=M, k=4)
  grid = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  one = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  lin = init_train_state(cfg, sj.TrainConfig(batch_size=N, encoder_init="linear"), one, x)
  fit = init_train_state(cfg, sj.TrainConfig(batch_size=N, encoder_init="linear_fit"), grid, x)
  assert fit.params["W_enc"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  w0, w = np.asarray(lin.params["W_enc"], np.float64), np.asarray(fit.params["W_enc"], np.float64)
  c = (w * w0).sum() / (w0 * w0).sum()
  np.testing.assert_allclose(w, c * w0, rtol=1e-5, atol=1e-7)
  for name in ("W_dec", "b_dec", "b_enc"):
    np.testing.assert_allclose(fit.params[name], lin.params[name], rtol=1e-5, atol=1e-6)
  args = (np.asarray(lin.params["W_dec"], np.float64), np.asarray(lin.params["b_dec"], np.float64))
  best = _np_first_batch_fvu(x, w, *args, 4)
  assert abs(c - 1) > 0.2, c
  assert best < _np_first_batch_fvu(x, 0.9 * w, *args, 4)
  assert best < _np_first_batch_fvu(x, 1.1 * w, *args, 4)
  assert best < _np_first_batch_fvu(x, w0, *args, 4)


@pytest.mark.parametrize("init", ["linear_fit", "data"])
def test_first_batch_encoder_inits_are_refused_for_other_architectures(init):
  cfg = sj.SAEConfig(architecture="jumprelu", d_in=D, d_sae=M, k=4)
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match=rf"encoder_init='{init}' needs architecture 'topk' "
                                        r"\(got 'jumprelu'\)"):
    init_train_state(cfg, sj.TrainConfig(batch_size=N, encoder_init=init), mesh, _data(1)[0])


def test_data_encoder_init_places_first_batch_directions():
  # encoder_init="data" on the sharded 2x4 mesh, checked in numpy against the linear draw of the
  # same seed: the first min(N, M) = N latents lie along N distinct first-batch tokens less
  # b_dec (decoder rows unit, encoder columns at the drawn columns' norms), the rest are the
  # linear draw, then W_enc is times c ** DATA_FIT_POWER, c the scalar that minimises the
  # first-batch error. The offset makes b_dec far from 0, so the centring is checked too.
  x = np.asarray(_data(1)[0], np.float64) + 5.0
  cfg = sj.SAEConfig(d_in=D, d_sae=M, k=4)
  grid = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  one = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  lin = init_train_state(cfg, sj.TrainConfig(batch_size=N, encoder_init="linear"), one, x)
  got = init_train_state(cfg, sj.TrainConfig(batch_size=N, encoder_init="data"), grid, x)
  assert got.params["W_dec"].sharding.spec == jax.sharding.PartitionSpec("model", None)
  p0 = {n: np.asarray(v, np.float64) for n, v in lin.params.items()}
  p = {n: np.asarray(v, np.float64) for n, v in got.params.items()}
  np.testing.assert_allclose(p["b_dec"], p0["b_dec"], rtol=1e-5, atol=1e-6)
  assert np.linalg.norm(p["b_dec"]) > 10.0
  xc = x - p["b_dec"]
  u = xc / np.linalg.norm(xc, axis=1, keepdims=True)
  tok = (p["W_dec"][:N] @ u.T).argmax(1)  # [N latents] -> token
  assert len(set(tok.tolist())) == N  # distinct tokens
  np.testing.assert_allclose(p["W_dec"][:N], u[tok], atol=1e-5)
  np.testing.assert_allclose(p["W_dec"][N:], p0["W_dec"][N:], atol=1e-6)
  w = p0["W_enc"].copy()
  w[:, :N] = u[tok].T * np.linalg.norm(w[:, :N], axis=0)
  scale = (p["W_enc"] * w).sum() / (w * w).sum()
  np.testing.assert_allclose(p["W_enc"], scale * w, rtol=1e-5, atol=1e-6)
  c = scale ** (1.0 / DATA_FIT_POWER)
  assert DATA_FIT_POWER == 0.75  # the quality benchmark's choice (quality_note.md, round 9)
  best = _np_first_batch_fvu(x, c * w, p["W_dec"], p["b_dec"], 4)
  assert abs(c - 1) > 0.2, c
  assert best < _np_first_batch_fvu(x, 0.9 * c * w, p["W_dec"], p["b_dec"], 4)
  assert best < _np_first_batch_fvu(x, 1.1 * c * w, p["W_dec"], p["b_dec"], 4)
