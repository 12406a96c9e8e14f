"""Test setup: eight forced CPU devices (for mesh tests) before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

# The references compute in float32 too; full-precision matmuls keep comparisons meaningful.
jax.config.update("jax_default_matmul_precision", "highest")
