"""Ahead-of-time planning: compile a trace's functions for a TPU slice from shapes alone and
project its memory, FLOPs and hours (GPU kinds estimated)."""

from sae_jax.planning.chips import GPUS, TPUS, Chip, resolve_target
from sae_jax.planning.planner import mesh_config, plan

__all__ = ["GPUS", "TPUS", "Chip", "mesh_config", "plan", "resolve_target"]
