"""The shipped config lives in the package (``sae-jax`` uses it after ``pip install``)."""

from sae_jax.configs.llm_jp_3_1p8b import get_config  # noqa: F401
