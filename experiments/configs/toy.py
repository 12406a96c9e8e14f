"""The shipped config lives in the package (``sae-jax`` uses it after ``pip install``)."""

from sae_jax.configs.toy import get_config  # noqa: F401
