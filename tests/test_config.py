import pytest

import sae_jax as sj
from sae_jax.errors import ConfigError


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(k=9000, d_sae=8192), "k=9000"),
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
