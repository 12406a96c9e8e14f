"""Registry of SAE architectures, keyed by their ``architecture`` name.

The built-in architectures register themselves when ``sae_jax.saes`` is imported. A name is
checked when it is looked up, so configs stay plain data that import nothing of the package.
"""

from __future__ import annotations

from sae_jax.errors import ConfigError

_REGISTRY: dict[str, object] = {}


def register(arch):
  """Class decorator: register an architecture class under its ``name``; returns it unchanged."""
  _REGISTRY[arch.name] = arch()
  return arch


def names() -> list[str]:
  """Registered architecture names, sorted."""
  return sorted(_REGISTRY)


def get(name: str):
  """The architecture instance registered as ``name``."""
  if name not in _REGISTRY:
    raise ConfigError(f"unknown architecture {name!r}; allowed: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def check(cfg) -> object:
  """Validate an SAEConfig against its architecture (name, k, options); returns the
  architecture. Call it before expensive work: it raises a one-line ConfigError."""
  arch = get(cfg.architecture)
  arch.validate(cfg)
  return arch
