import jax
import pytest

import sae_jax as sj
from sae_jax.errors import ConfigError


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(k=9000, d_sae=8192), "k=9000 must be <= d_sae=8192"),
    (dict(k=0), "k=0"),
    (dict(architecture="gated"), "unknown architecture 'gated'"),
    (dict(normalize="layer"), "normalize='layer'"),
    (dict(d_in=0), "d_in=0"),
    (dict(param_dtype="int8"), "param_dtype='int8'"),
    (dict(architecture="topk", k=None), "k=None"),
])
def test_sae_config_rejects_bad_values_with_one_line(kwargs, fragment):
  # The config checks its own values; the architecture's (name, k) are checked on lookup.
  with pytest.raises(ConfigError) as e:
    sj.saes.registry.check(sj.SAEConfig(**kwargs))
  msg = str(e.value)
  assert fragment in msg and "\n" not in msg


def test_dense_architectures_do_not_need_k():
  assert sj.SAEConfig(architecture="relu", k=None).k is None
  assert sj.SAEConfig(architecture="jumprelu", k=None).k is None


@pytest.mark.parametrize("cls, kwargs, fragment", [
    (sj.TrainConfig, dict(batch_size=0), "batch_size=0"),
    (sj.OptimConfig, dict(lr=-1.0), "lr=-1.0"),
    (sj.OptimConfig, dict(lr_schedule="linear"), "lr_schedule='linear'"),
    (sj.OptimConfig, dict(adam_eps=0.0), "adam_eps=0.0"),
    (sj.RunConfig, dict(log_every=0), "log_every=0"),
])
def test_train_config_rejects_bad_values(cls, kwargs, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
    cls(**kwargs)


def test_json_round_trip_and_unknown_field():
  cfg = sj.SAEConfig(architecture="batchtopk", d_in=64, d_sae=256, k=8, normalize="unit_norm")
  assert sj.SAEConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ConfigError, match="unknown SAEConfig field"):
    sj.SAEConfig.from_dict({"d_inn": 3})


def test_default_learning_rate_follows_gao_scaling():
  assert sj.OptimConfig().learning_rate(2**14) == pytest.approx(2e-4)
  assert sj.OptimConfig().learning_rate(2**16) == pytest.approx(1e-4)
  assert sj.OptimConfig(lr=1e-3).learning_rate(2**16) == 1e-3


def test_mesh_that_does_not_tile_devices_is_rejected():
  with pytest.raises(ConfigError, match="does not tile"):
    sj.make_mesh(sj.MeshConfig(data=3, model=2))


def test_mesh_devices_takes_the_first_devices_and_is_checked():
  mesh = sj.make_mesh(sj.MeshConfig(devices=1))
  assert dict(mesh.shape) == {"data": 1, "model": 1}
  assert list(mesh.devices.flat) == jax.devices()[:1]
  mesh = sj.make_mesh(sj.MeshConfig(data=-1, model=2, devices=6))
  assert dict(mesh.shape) == {"data": 3, "model": 2}
  assert list(mesh.devices.flat) == jax.devices()[:6]
  with pytest.raises(ConfigError, match="does not tile the 4 available"):
    sj.make_mesh(sj.MeshConfig(data=3, model=1, devices=4))
  with pytest.raises(ConfigError, match="mesh devices=9: 8 device"):
    sj.make_mesh(sj.MeshConfig(devices=9))
  with pytest.raises(ConfigError, match="mesh devices=-1 must be >= 0"):
    sj.MeshConfig(devices=-1)


# ---- shipped configs: every field says what the config means --------------------------------

import importlib.util
import json
from pathlib import Path

from sae_jax.cli import trace_config_from
from sae_jax.train.jobs import check_same_run, run_config

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "data" / "legacy_v1"


def _shipped(name: str, arg: str = "", workdir: str = "/w") -> sj.TraceConfig:
  path = ROOT / "experiments" / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return trace_config_from(mod.get_config(arg), workdir)


@pytest.mark.parametrize("arg", ["", "tiny"])
def test_paper_config_says_what_the_paper_did(arg):
  c = _shipped("llm_jp_3_1p8b", arg)
  assert c.model == "llm-jp/llm-jp-3-1.8b"
  assert c.revisions == ("step10", "step100", "step1000", "step10000", "step100000",
                         "step988240")
  assert c.hooks == ("resid_post.11",)  # the output of block 12
  assert c.extract.dtype == "bfloat16"  # the 1.8B model runs in bfloat16, not float32
  assert (c.sae.architecture, c.sae.k, c.sae.normalize) == ("topk", 32, "unit_norm")
  assert c.sae.param_dtype == "bfloat16"  # the v1 SAE's torch_dtype
  assert c.expansion * 2048 == 32768
  assert c.train.batch_size == 32768
  assert c.train.optim == sj.OptimConfig(lr=1e-3, lr_schedule="constant", warmup_steps=1000,
                                         adam_eps=6.25e-10)
  assert c.train.encoder_init == "linear" and c.train.aux_k == 0  # no dead-latent handling
  assert c.train.geometric_median_iters == 100
  # 165M tokens, 0.8 of them trained on once: 2,062,499 documents of 64 tokens, 4,028 steps.
  if not arg:
    assert c.data.max_docs == 2_062_499 and c.train.total_tokens == 4028 * 32768
  # 64 tokens after BOS (BOS dropped from the activations), shorter documents dropped, ja and
  # en from two sources held 50/50.
  assert (c.data.ctx_len, c.data.min_tokens, c.data.mode) == (65, 65, "truncate")
  assert len(c.data.paths) == 2 and c.data.source_languages == ("ja", "en") and c.data.balance
  assert c.outputs.exports == ("llm_jp_sae", "sae_lens")


def test_toy_and_pythia_configs_hold_their_settings():
  toy = _shipped("toy", "tiny", "/w")
  assert toy.toy and toy.toy_size == "tiny" and toy.model == "/w/toy_model"
  assert toy.data.path == "/w/toy_model" and toy.hooks == ("resid_post.0",)
  assert toy.train.optim.lr == 2e-3 and toy.train.optim.warmup_steps == 20
  assert toy.train.run.log_every == 20 and toy.outputs.eval_batches == 2
  assert toy.seed_baseline == ("every",) and toy.extract.activations == "stream"
  pythia = _shipped("pythia")
  assert pythia.train.optim.lr is None and pythia.sae.normalize == "expected_norm"
  assert pythia.outputs.exports == ("sae_lens", "sparsify")


def test_a_lone_string_is_one_item_not_its_letters():
  c = sj.TraceConfig(model="m", hooks="resid_post.3", outputs=sj.OutputConfig(exports="sae_lens"))
  assert c.hooks == ("resid_post.3",) and c.outputs.exports == ("sae_lens",)
  d = json.loads(c.to_json())
  d["outputs"]["exports"] = "sparsify"  # as --config.outputs.exports=sparsify gives it
  assert sj.TraceConfig.from_dict(d).outputs.exports == ("sparsify",)


def test_unknown_export_format_is_named_before_any_work():
  from sae_jax.trace import validate
  with pytest.raises(ConfigError, match=r"unknown export format\(s\) \['safetensor'\]"):
    validate(sj.TraceConfig(model="m", outputs=sj.OutputConfig(exports=("safetensor",))))


def test_architecture_options_live_with_the_architecture():
  cfg = sj.SAEConfig(architecture="jumprelu", k=None, options={"bandwidth": 0.01})
  opts = sj.saes.registry.check(cfg).options(cfg)
  assert (opts.bandwidth, opts.init_threshold, opts.l0_coefficient) == (0.01, 0.001, 1e-3)
  assert hash(cfg) == hash(sj.SAEConfig.from_json(cfg.to_json()))  # a jit static argument
  with pytest.raises(ConfigError, match=r"unknown topk option\(s\) \['cap'\]; allowed: \[\]"):
    sj.saes.registry.check(sj.SAEConfig(options={"cap": 2}))
  with pytest.raises(ConfigError, match="batchtopk cap=0"):
    sj.saes.registry.check(sj.SAEConfig(architecture="batchtopk", options={"cap": 0}))


# ---- files written before the config split still load (tests/data/legacy_v1) -----------------


def test_legacy_trace_json_loads_as_todays_config():
  old = json.loads((LEGACY / "trace.json").read_text())
  assert "lr" in old["train"] and "activations" in old  # really the flat layout
  want = _shipped("toy", "tiny").replace(model="TOY")
  # What the tiny config said then and no longer says: the init, the logging and checkpoint
  # intervals, the context length, one seed baseline.
  run = want.train.run.replace(log_every=40, checkpoint_every=100)
  want = want.replace(data=want.data.replace(path="TOY", ctx_len=40),
                      train=want.train.replace(encoder_init="tied", run=run),
                      seed_baseline=("final",))
  assert sj.TraceConfig.from_dict(old) == want


def test_legacy_run_config_resumes_without_a_difference(tmp_path):
  old = json.loads((LEGACY / "run_config.json").read_text())
  run = sj.store.RunDir(tmp_path / "run")
  run.ensure()
  sj.store.atomic_write_json(run.config, old)
  want = _shipped("toy", "tiny")
  sae_cfg = want.sae.replace(d_in=64, d_sae=512)
  tied = want.train.replace(encoder_init="tied")  # the init the old run used
  check_same_run(run, run_config(sae_cfg, tied), overwrite=False)  # no ConfigError
  with pytest.raises(ConfigError, match=r"train.optim.lr: 0.002 -> 0.003"):
    other = tied.replace(optim=tied.optim.replace(lr=3e-3))
    check_same_run(run, run_config(sae_cfg, other), overwrite=False)
  # Today's default init differs from the old run's: said in one line, nothing discarded.
  with pytest.raises(ConfigError, match=r"train.encoder_init: 'tied' -> 'linear'"):
    check_same_run(run, run_config(sae_cfg, want.train), overwrite=False)
  assert json.loads(run.config.read_text()) == old


def test_legacy_architecture_fields_become_options():
  old = json.loads((LEGACY / "sae_cfg.json").read_text())["sae"]
  assert sj.SAEConfig.from_dict(old) == sj.SAEConfig(d_in=64, d_sae=512, k=8,
                                                     normalize="unit_norm")
  jr = {**old, "architecture": "jumprelu", "jumprelu_bandwidth": 0.05}
  assert sj.SAEConfig.from_dict(jr).option_dict() == {"bandwidth": 0.05}
  trace = json.loads((LEGACY / "trace.json").read_text())
  trace["sae"]["architecture"] = "relu"
  trace["train"]["l1_coefficient"] = 2.0
  assert sj.TraceConfig.from_dict(trace).sae.option_dict() == {"l1_coefficient": 2.0}
