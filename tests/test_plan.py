"""The ahead-of-time planner: the tiny toy trace compiled for a TPU v5e 2x2 slice (libtpu, no
TPU), its report's fields and their plausibility, the loop-counted FLOPs, and the bad inputs."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import sae_jax as sj
from sae_jax.cli import trace_config_from
from sae_jax.config import MeshConfig
from sae_jax.errors import ConfigError
from sae_jax.planning import chips, costs, planner

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("name", "tokens_per_step", "flops_per_chip", "bytes_accessed_per_chip",
          "argument_bytes_per_chip", "output_bytes_per_chip", "temp_bytes_per_chip",
          "hbm_bytes_per_chip", "fits", "roofline_step_s", "collectives")

# CI installs the tpu extra; without libtpu only the tests that compile nothing run.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the tpu extra) is not installed")


def _config(name: str, arg: str, workdir):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "configs" /
                                                f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return trace_config_from(mod.get_config(arg), str(workdir))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _config("toy", "tiny", tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def reports(tiny):
  return sj.plan(tiny, "v5e:2x2")


@needs_libtpu
def test_tiny_toy_trace_compiles_for_v5e_and_reports_every_field(tiny, reports):
  assert [r["name"] for r in reports] == ["forward", "mix", "sae_step", "eval", "trace"]
  json.dumps(reports)  # JSON lines as the CLI prints them
  for r in reports[:4]:
    assert set(FIELDS) <= set(r), r["name"]
    assert r["mesh"] == {"data": 4, "model": 1} and r["fits"]
    assert r["flops_per_chip"] > 0 and r["bytes_accessed_per_chip"] > 0
    assert r["hbm_bytes_per_chip"] >= (r["argument_bytes_per_chip"] + r["temp_bytes_per_chip"]
                                       + r["output_bytes_per_chip"] - r["alias_bytes_per_chip"])
    assert r["roofline_step_s"] == max(r["compute_s"], r["memory_s"], r["collective_s"]) > 0
  fwd, mix, step, ev, trace = reports
  sae = tiny.sae
  n, d_in, d_sae = tiny.train.batch_size, 64, tiny.expansion * 64  # the tiny toy model's width
  # The step at least runs the encoder matmul on its quarter of the tokens, and not much more.
  least = 2 * n * d_in * d_sae / 4
  assert least <= step["flops_per_chip"] <= 2 * least
  assert step["tokens_per_step"] == n
  # Data parallel over 4 chips: every chip holds the whole SAE (W_enc and W_dec with their two
  # Adam moments, float32), and the gradients are summed across chips.
  assert step["argument_bytes_per_chip"] >= 3 * 2 * d_in * d_sae * 4
  assert step["collectives"]["all-reduce"]["bytes"] >= 2 * d_in * d_sae * 4
  assert fwd["tokens_per_step"] == tiny.data.batch_size * (tiny.data.ctx_len - 1)
  # The evaluation runs the whole model (2 blocks and the unembedding) with the SAE spliced in;
  # the forward stops after the hook's block (resid_post.0).
  assert ev["flops_per_chip"] > 2 * fwd["flops_per_chip"]
  assert sae.k <= d_sae
  # The mixing buffer: one all-to-all per hook, each chip's pool about its share of a round
  # (never a whole round on every chip), float32 rows.
  round_rows = tiny.data.buffer_batches * tiny.data.batch_size * tiny.data.ctx_len
  share = round_rows * 64 * 4 * len(tiny.hooks) / 4
  assert set(mix["collectives"]) == {"all-to-all"}, mix["collectives"]
  assert mix["collectives"]["all-to-all"]["count"] == len(tiny.hooks)
  assert share <= mix["output_bytes_per_chip"] <= 1.5 * share + 4 * n * 64 * len(tiny.hooks)
  assert mix["temp_bytes_per_chip"] < share


@needs_libtpu
def test_trace_projection_counts_the_whole_study(tiny, reports):
  *_, trace = reports
  assert trace["checkpoints"] == 7  # the tiny toy run's log-spaced checkpoints (no step 1)
  assert trace["saes"] == 8  # one per checkpoint, and a seed baseline at the final one
  assert trace["sae_steps"] == 8 * tiny.train.total_tokens // tiny.train.batch_size
  assert trace["eval_steps"] == 8 * tiny.outputs.eval_batches * 3  # clean, spliced, ablated
  seconds = sum(trace["hours_by_function"].values()) * 3600
  fwd, mix, step, ev = reports[:4]
  rounds = 7 * -(-trace["forward_steps"] // 7 // tiny.data.buffer_batches)
  assert seconds == pytest.approx(trace["forward_steps"] * fwd["roofline_step_s"]
                                  + rounds * mix["roofline_step_s"]
                                  + trace["sae_steps"] * step["roofline_step_s"]
                                  + trace["eval_steps"] * ev["roofline_step_s"])
  assert trace["hours"] == pytest.approx(seconds / 3600)
  assert trace["chip_hours"] == pytest.approx(4 * trace["hours"])
  assert trace["fits"] and "estimate" not in trace


@needs_libtpu
def test_loop_free_flops_agree_with_xla(reports):
  # The forward has no loop: the jaxpr count and XLA's cost analysis of the TPU program agree.
  fwd = reports[0]
  assert fwd["flops_per_chip"] == pytest.approx(fwd["xla_flops_per_chip"], rel=0.05)


def test_scan_bodies_count_every_trip():
  w = jnp.ones((48, 40), jnp.float32)

  def looped(x):
    return jax.lax.scan(lambda c, xi: (c + jnp.tanh(xi @ w), None), jnp.zeros((24, 40)), x)[0]

  def unrolled(x):
    c = jnp.zeros((24, 40))
    for i in range(x.shape[0]):
      c = c + jnp.tanh(x[i] @ w)
    return c

  x = jax.ShapeDtypeStruct((8, 24, 48), jnp.float32)
  xla = lambda f: jax.jit(f).lower(x).compile().cost_analysis()["flops"]
  counted = costs.jaxpr_costs(jax.make_jaxpr(looped)(x), [1], 1).flops
  assert counted == pytest.approx(xla(unrolled), rel=0.05)
  assert counted == pytest.approx(8 * 2 * 24 * 48 * 40, rel=0.05)  # the matmuls dominate
  assert xla(looped) < counted / 4  # what XLA's count of a while loop misses


@needs_libtpu
def test_a_study_that_does_not_fit_says_so_and_names_a_layout(tiny, reports, monkeypatch):
  target = planner.Target("v5e:2x2", dataclasses.replace(chips.TPUS["v5e"], hbm_bytes=1e6),
                          tuple(chips.tpu_devices("v5e:2x2")), 4, False)
  trace = planner.project(tiny, target, reports[:4])
  assert not trace["fits"] and trace["hbm_bytes_per_chip"] > 1e6

  def shrunk(cfg, tgt, mesh, family, mc):  # as if the (2, 2) layout needed 1000x less
    scale = 1e-3 if dict(mesh.shape) == {"data": 2, "model": 2} else 1.0
    return [{**r, **{k: r[k] * scale for k in r if k.endswith("bytes_per_chip")},
             "fits": scale < 1, "mesh": dict(mesh.shape)} for r in reports[:4]]

  monkeypatch.setattr(planner, "_plan_on", shrunk)
  advice = planner._advice(tiny, target, None, None, reports[:4])
  assert advice.startswith("does not fit: ") and "GiB per chip" in advice
  assert advice.endswith("--mesh=2,2 fits") and "\n" not in advice


def test_bad_topology_mesh_and_missing_libtpu_are_one_line_errors(tiny, monkeypatch):
  with pytest.raises(ConfigError, match=r"unknown topology 'v9:2x2'; allowed: .*v5e:4x4") as e:
    sj.plan(tiny, "v9:2x2")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="expected two integers"):
    planner.mesh_config("4x4")
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(ConfigError, match=r"needs libtpu: pip install 'sae_jax\[tpu\]'"):
    sj.plan(tiny, "v5e:2x2")


@needs_libtpu
def test_a_mesh_off_the_chip_count_and_unplannable_models_are_one_line_errors(tiny, tmp_path):
  with pytest.raises(ConfigError, match="does not tile the 4 available devices"):
    sj.plan(tiny, "v5e:2x2", MeshConfig(data=3, model=1))
  with pytest.raises(ConfigError, match="cannot plan model 'someone/unknown-lm'"):
    sj.plan(dataclasses.replace(tiny, toy=False, model="someone/unknown-lm",
                                revisions=("main",)), "v5e:2x2")
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ConfigError, match="the port cannot plan model .*'bert'"):
    sj.plan(tiny, "v5e:2x2", model_config=str(tmp_path / "config.json"))


def test_loops_are_counted_per_trip_in_flops_and_collectives():
  # XLA's cost analysis and the compiled HLO's text show a loop body once: the planner counts
  # a scan's body x its length, a while loop that states its trips x those, and a collective
  # inside a loop once per trip (from the loop's bound in the HLO).
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sj.make_mesh(MeshConfig(data=4, model=1), devices=jax.devices()[:4])
  w = jnp.ones((8, 8))

  def step(x):
    def body(c, _):
      return jax.lax.psum(c @ w, "data"), None
    return jax.lax.scan(body, x, None, length=5)[0]

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                             check_vma=False))
  x = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data")))
  got = costs.hlo_collectives(fn.lower(x).compile().as_text())
  assert got["all-reduce"]["count"] == 5, got
  assert got["all-reduce"]["bytes"] == 5 * 4 * 8 * 4, got

  def stated(x):
    with jax.named_scope("while_trips_3"):
      return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w),
                                (0, x))[1]

  def unstated(x):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

  one_matmul = 2 * 16 * 8 * 8  # plus one FLOP a trip for the counter
  c = costs.jaxpr_costs(jax.make_jaxpr(stated)(x), [1], 1)
  assert c.flops == 3 * (one_matmul + 1) and c.unbounded_loops == 0
  c = costs.jaxpr_costs(jax.make_jaxpr(unstated)(x), [1], 1)
  assert c.flops == one_matmul + 1 and c.unbounded_loops == 1
  # A scatter-add carries its combiner as a sub-jaxpr: it is still one op of its own cost.
  scatter = jax.make_jaxpr(lambda a, i, u: a.at[i].add(u))(
      jnp.zeros((64, 8)), jnp.zeros((32,), jnp.int32), jnp.ones((32, 8)))
  assert costs.jaxpr_costs(scatter, [1, 1, 1], 1).flops >= 32 * 8  # (+ index arithmetic)
