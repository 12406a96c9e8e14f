"""The on-device mixing buffer: the host mixer's rows, on the devices, under the transfer guard;
the trace on a (data=2, model=4) mesh against one device, streaming and from a cache; rounds
prepared one ahead on a thread; mesh mistakes."""

import itertools
import threading

import jax
import numpy as np
import pytest

import sae_jax as sj
from sae_jax import sharding
from sae_jax.cli import trace_config_from
from sae_jax.config import MeshConfig
from sae_jax.configs.toy import get_config
from sae_jax.data.activations import ActivationStream, keep_mask
from sae_jax.data.cache import CacheReader
from sae_jax.data.device_mix import DeviceBatches, DeviceStream
from sae_jax.errors import ConfigError, DataError
from sae_jax.train.step import make_train_step
from sae_jax.train.state import init_train_state
from sae_jax.trace import trace

HOOKS = ("resid_post.0", "resid_post.1")


def _data(toy, **kw):
  return sj.DataConfig(source="toy", path=str(toy), max_docs=300, ctx_len=16, batch_size=8,
                       buffer_batches=3, seed=5, **kw)


def _streams(toy, mesh, model_mesh=None):
  model = sj.load_model(toy, revision="step30", mesh=model_mesh)
  cfg = _data(toy)
  host = ActivationStream(model, sj.data.token_batches(model, cfg), HOOKS, cfg.buffer_batches,
                          cfg.seed)
  return host, DeviceStream(host, mesh)


def _host_rows(host, start, n):
  got = list(itertools.islice(host.rows_from(start), 40))
  rows = {h: np.concatenate([c.acts[h] for c in got]) for h in HOOKS}
  return {h: r[:n] for h, r in rows.items()}


def test_device_rows_are_the_host_mixers_rows_bit_for_bit_on_one_device(tiny_toy):
  """Same kept rows, same (seed, round) order, same metadata; batches cross round ends and
  a start in the middle of a round (a resume) reads from there."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  host, dev = _streams(tiny_toy, mesh)
  assert dev.n_rounds >= 3 and dev.round_size(0) < dev.capacity  # BOS rows are dropped
  size, start = 96, 37
  blocks = list(itertools.islice(dev.blocks(start, size), 8))
  got = {h: np.concatenate([np.asarray(b[h]) for b in blocks]) for h in HOOKS}
  want = _host_rows(host, start, len(blocks) * size)
  assert len(blocks) * size > dev.round_size(0) + dev.round_size(1)  # two round ends crossed
  for h in HOOKS:
    np.testing.assert_array_equal(got[h], want[h], err_msg=h)
  meta, rows = dev.round_meta(1), host.round_rows(1)
  for f in ("token", "doc", "pos", "language"):
    np.testing.assert_array_equal(getattr(meta, f), getattr(rows, f), err_msg=f)


def _plan_in_place(dev, r):
  """Round r's mixed kept rows as the stream built them before it prefetched: on the
  caller's thread, from the token batches."""
  parts = [dev.batches.global_batch(g) for g in dev._globals(r)]
  kept = np.flatnonzero(np.concatenate([keep_mask(b, dev.special_ids).reshape(-1)
                                        for b in parts]))
  return kept[np.random.default_rng([dev.seed, r]).permutation(len(kept))]


def _mix_threads():
  return [t for t in threading.enumerate() if t.name.startswith("sae_jax-device-mix")]


def test_rounds_prepared_one_ahead_on_a_thread_give_the_same_rows(tiny_toy, monkeypatch):
  """Each round is built and put by the background thread, its plan and token batches are
  the ones built in place, a start in mid-stream reads the same rows as a full pass, and
  the thread is gone when the stream ends."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, dev = _streams(tiny_toy, mesh)
  stage, where = dev.stage, {}

  def spy(host_round, *args):
    where[host_round.r] = threading.current_thread().name
    return stage(host_round, *args)

  monkeypatch.setattr(dev, "stage", spy)
  got = list(dev.staged_rounds(1, 64))
  assert [s.host.r for s in got] == list(range(1, dev.n_rounds)) and len(got) >= 2
  assert all(where[r].startswith("sae_jax-device-mix") for r in range(1, dev.n_rounds))
  for s in got:
    np.testing.assert_array_equal(s.host.plan.index[:s.host.plan.n],
                                  _plan_in_place(dev, s.host.r), err_msg=str(s.host.r))
    assert not s.host.plan.index[s.host.plan.n:].any()
    lo = s.host.r * dev.steps_per_round
    for i, (ids, mask) in enumerate(s.steps):
      np.testing.assert_array_equal(np.asarray(ids), dev.batches[lo + i].ids)
      np.testing.assert_array_equal(np.asarray(mask), dev.batches[lo + i].mask)
  size, start = 64, 3 * 64 + 29
  full = np.concatenate([np.asarray(b[HOOKS[0]]) for b in dev.blocks(0, size)])
  tail = np.concatenate([np.asarray(b[HOOKS[0]]) for b in dev.blocks(start, size)])
  np.testing.assert_array_equal(tail, full[start:start + len(tail)])
  assert len(tail) == (sum(map(dev.round_size, range(dev.n_rounds))) - start) // size * size
  assert not _mix_threads()


def test_a_failing_round_is_raised_in_one_line_and_the_thread_ends(tiny_toy, monkeypatch):
  """The producer's exception reaches the consumer as it was raised (type and message), after
  the rows of the rounds before it; closing a stream early also ends its thread."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, dev = _streams(tiny_toy, mesh)
  blocks = dev.blocks(0, 32)
  next(blocks)
  blocks.close()
  assert not _mix_threads()
  read, bad = dev.batches.global_batch, dev._globals(1)[1]

  def global_batch(g):
    if g == bad:
      raise DataError(f"token batch {g} is unreadable")
    return read(g)

  monkeypatch.setattr(dev.batches, "global_batch", global_batch)
  served = 0
  with pytest.raises(DataError) as e:
    for _ in dev.blocks(0, 32):
      served += 1
  assert str(e.value) == f"token batch {bad} is unreadable"
  assert served == dev.round_size(0) // 32 and not _mix_threads()


def test_stream_on_a_2x4_mesh_runs_under_the_transfer_guard(tiny_toy):
  """Forward, mixing, batches and SAE steps with no implicit host round trip; the rows equal
  the host mixer's to float rounding (the forward is tensor-parallel here)."""
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  host, dev = _streams(tiny_toy, mesh, model_mesh=mesh)
  sae_cfg = sj.SAEConfig(architecture="topk", d_in=dev.d_model, d_sae=64, k=4)
  tcfg = sj.TrainConfig(batch_size=64, total_tokens=64 * 6, auxk_coef=0.0)
  step = make_train_step(sae_cfg, tcfg, mesh)
  batches = DeviceBatches(dev, 64, tcfg.total_tokens, holdout=32, hook=HOOKS[1])
  it = iter(batches)
  first = next(it)  # compiles the programs and reads the held-out rows (copied to the host)
  state = init_train_state(sae_cfg, tcfg, mesh, first)
  seen = [first]
  with jax.transfer_guard("disallow"):
    state, _ = step(state, first)
    for x in it:
      assert x.sharding.spec[0] == "data" and x.shape == (64, dev.d_model)
      state, metrics = step(state, x)
      seen.append(x)
  assert batches.served == len(seen) == 6 and int(jax.device_get(state.step)) == 6
  want = _host_rows(host, 0, 32 + 6 * 64)[HOOKS[1]]
  np.testing.assert_allclose(batches.eval_rows, want[:32], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in seen]), want[32:],
                             rtol=1e-5, atol=1e-5)


def _trace_cfg(toy, **kw):
  c = get_config("tiny")
  c.model, c.data.path = str(toy), str(toy)
  c.revisions, c.seed_baseline, c.outputs.analyze = ("step30",), ("none",), False
  c.hooks = HOOKS[1:]  # side by side on the mesh: test_trace's SAE and its seed baseline
  c.outputs.exports, c.outputs.eval_batches = (), 0  # no spliced LM eval: not under test
  c.data.max_docs, c.data.buffer_batches = 400, 4
  c.train.total_tokens, c.train.eval_tokens, c.train.batch_size = 8 * 512, 256, 512
  for k, v in kw.items():
    setattr(c, k, v)
  return trace_config_from(c, "unused")


def test_trace_on_a_2x4_mesh_gives_the_saes_of_one_device(tiny_toy, tmp_path):
  """Tolerance, stated before running: parameters within rtol=atol=2e-4 after 8 steps (the
  sharded forward and the latent-split step sum in another order; nothing else differs)."""
  trace(_trace_cfg(tiny_toy, mesh=dict(data=2, model=4)), tmp_path / "mesh")
  trace(_trace_cfg(tiny_toy, mesh=dict(data=1, model=1)), tmp_path / "one",
        devices=jax.devices()[:1])
  for h in HOOKS[1:]:
    a = sj.load_sae(tmp_path / "mesh" / "step30" / h / "sae")
    b = sj.load_sae(tmp_path / "one" / "step30" / h / "sae")
    for k in a.params:
      np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(b.params[k]), rtol=2e-4,
                                 atol=2e-4, err_msg=f"{h} {k}")


def test_cache_mode_trace_on_a_2x4_mesh_gives_the_cache_and_saes_of_one_device(tiny_toy,
                                                                                tmp_path):
  """Cache mode on the mesh: the tensor-parallel model writes every batch's rows, the SAEs
  train from the cache. Tolerances, stated before running: the cached rows within
  rtol=atol=1e-5 of one device's (float32 rows of a forward summed in another order), the
  parameters within rtol=atol=2e-4 as above."""
  def cached(mesh):
    c = _trace_cfg(tiny_toy, mesh=mesh)
    return c.replace(extract=c.extract.replace(activations="cache", cache_dtype="float32"))

  trace(cached(dict(data=2, model=4)), tmp_path / "mesh")
  trace(cached(dict(data=1, model=1)), tmp_path / "one", devices=jax.devices()[:1])
  for h in HOOKS[1:]:
    a, b = (CacheReader(tmp_path / w / "activations" / "step30" / h) for w in ("mesh", "one"))
    assert a.done == b.done and len(a) > 8 * 512
    np.testing.assert_allclose(np.concatenate(list(a)), np.concatenate(list(b)), rtol=1e-5,
                               atol=1e-5, err_msg=h)
    a = sj.load_sae(tmp_path / "mesh" / "step30" / h / "sae")
    b = sj.load_sae(tmp_path / "one" / "step30" / h / "sae")
    for k in a.params:
      np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(b.params[k]), rtol=2e-4,
                                 atol=2e-4, err_msg=f"{h} {k}")


@pytest.mark.parametrize("mesh, fragment", [
    (dict(data=4, model=4), "mesh data=4 x model=4 asks for 16 devices; 8 exist"),
    (dict(data=-1, model=3), "does not tile the 8 available devices"),
    (dict(data=8, model=1), "data batch_size=4 x 1 process(es) is not divisible by the mesh "
                            "'data' axis size 8"),
    (dict(data=1, model=8), "d_sae=100 is not divisible by the mesh 'model' axis size 8"),
    (dict(devices=16), "mesh devices=16: 8 device(s) in 1 process(es)"),
    (dict(data=2, model=2, devices=2), "mesh data=2 x model=2 asks for 4 devices; 2 exist"),
])
def test_mesh_mistakes_are_one_line_before_the_model_loads(tiny_toy, tmp_path, monkeypatch,
                                                           mesh, fragment):
  def no_load(*a, **k):
    raise AssertionError("the model was loaded before the mesh was checked")

  import sys
  monkeypatch.setattr(sys.modules["sae_jax.trace"], "load_model", no_load)
  cfg = _trace_cfg(tiny_toy, mesh=mesh, expansion=0, sae=dict(architecture="topk", d_in=1,
                                                               d_sae=100, k=4))
  cfg = cfg.replace(data=cfg.data.replace(batch_size=4))
  with pytest.raises(ConfigError) as e:
    trace(cfg, tmp_path / "w")
  assert fragment in str(e.value) and "\n" not in str(e.value)
