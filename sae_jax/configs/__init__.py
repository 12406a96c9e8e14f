"""Shipped trace configs (ml_collections): ``toy`` (the default), ``llm_jp_3_1p8b``, ``pythia``."""
