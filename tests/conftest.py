"""Test setup: eight forced CPU devices (for mesh tests) before JAX is imported anywhere."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent compilation cache for the whole run: xdist workers and the tests' subprocesses
# (multi-host, kill-and-resume, bucket traces) compile the same step and forward programs again
# and again, and on two cores compiling is most of the suite's time. Programs are looked up by
# their HLO and the XLA flags, so a hit runs exactly what a fresh compile would. Every program,
# however quick to compile: a fresh interpreter compiles dozens of small ones (init, eval,
# medians), seconds in all, that the other worker and every subprocess would compile again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"sae_jax_tests_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The references compute in float32 too; full-precision matmuls keep comparisons meaningful.
# Through the environment, so the tests' subprocesses compute (and look programs up in the cache)
# as this process does.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
  """A toy-world model with a few real checkpoints (step0 ... step30), trained once per run."""
  from sae_jax.toy.lm import TINY_LM, TINY_WORLD, train_toy_lm
  out = tmp_path_factory.mktemp("tiny_toy")
  train_toy_lm(out, TINY_WORLD, TINY_LM.__class__(**{**TINY_LM.__dict__, "steps": 30,
                                                      "train_docs": 3000, "eval_docs": 50}))
  return out
