"""SAE training: state, jitted sharded step, jobs, periodic actions, the fit loop."""

from sae_jax.train.jobs import CompletionHook, SAEJob
from sae_jax.train.loop import Trainer, train_sae, train_saes
from sae_jax.train.state import TrainState, init_train_state, make_optimizer
from sae_jax.train.step import METRIC_NAMES, TrainStep, make_train_step

__all__ = ["METRIC_NAMES", "CompletionHook", "SAEJob", "TrainState", "TrainStep", "Trainer",
           "init_train_state", "make_optimizer", "make_train_step", "train_sae", "train_saes"]
