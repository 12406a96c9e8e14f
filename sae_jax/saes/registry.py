"""Registry of SAE architectures, keyed by their ``architecture`` name."""

from __future__ import annotations

_REGISTRY: dict[str, object] = {}


def register(arch):
  """Class decorator: register an architecture class under its ``name``; returns it unchanged."""
  _REGISTRY[arch.name] = arch()
  return arch


def names() -> list[str]:
  """Registered architecture names, sorted."""
  _load_builtin()
  return sorted(_REGISTRY)


def get(name: str):
  """The architecture instance registered as ``name``."""
  _load_builtin()
  if name not in _REGISTRY:
    from sae_jax.errors import ConfigError
    raise ConfigError(f"unknown architecture {name!r}; allowed: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def _load_builtin() -> None:
  # Imported lazily: the architecture modules import config, which validates against us.
  from sae_jax.saes import batchtopk, jumprelu, relu, topk  # noqa: F401
