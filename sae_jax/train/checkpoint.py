"""Orbax checkpoints of the train state together with the data position.

Each checkpoint holds ``state`` (the TrainState, restored straight into its shardings) and
``data`` (JSON: the batch stream's position). Orbax writes each step to a temporary directory
and renames it when complete, so a kill at any moment leaves only whole checkpoints; a latest
checkpoint that still fails to restore (damaged on disk) is moved aside with a warning and the
previous one is used.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging

from sae_jax import distributed, paths
from sae_jax.train.state import TrainState


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run under ``directory`` (async writes)."""

  def __init__(self, directory: Path, keep: int):
    # Orbax takes epath paths: a gs:// directory is written through tensorstore's gcs driver,
    # and completion there is Orbax's commit marker instead of a rename.
    self.directory = (paths.as_path(directory) if paths.is_remote(directory)
                      else Path(directory).absolute())
    self.keep = keep
    self._manager = self._open()
    self.last_save_blocking_s = 0.0
    self.last_saved_step: int | None = None  # by this object (restored runs: the restored step)

  def _open(self) -> ocp.CheckpointManager:
    # Several runs (the SAEs of one stream) save the same step at once; on several hosts their
    # Orbax barriers must not share names, or one run's barrier passes on another's arrival and
    # finalises before every host's metadata is written.
    key = hashlib.sha1(str(self.directory).encode()).hexdigest()[:12]
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=f"sae_jax_{key}"))
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_position: dict) -> None:
    """Start writing checkpoint ``step``; returns once device buffers are copied to host."""
    t = time.perf_counter()
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)), force=True)
    self.last_save_blocking_s = time.perf_counter() - t
    self.last_saved_step = step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: TrainState, only: set[int] | None = None
                     ) -> tuple[TrainState, dict] | None:
    """(state, data position) of the newest checkpoint (among ``only``) that restores.

    A checkpoint that fails to restore is moved aside with a warning; None if none restores.
    """
    for step in reversed(self.steps()):
      if only is not None and step not in only:
        continue
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        self.last_saved_step = step
        return out["state"], dict(out["data"])
      except Exception as e:  # a damaged checkpoint may fail in many ways; all mean "skip it"
        aside = self.directory / f"corrupt_{step}_{int(time.time())}"
        logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved to %s, "
                        "falling back to the previous one", step, self.directory,
                        type(e).__name__, str(e)[:200], aside.name)
        self._manager.close()
        if jax.process_index() == 0:  # every host fails alike; one moves it aside
          if paths.is_remote(self.directory):  # no rename on a bucket: copy, then delete
            (self.directory / str(step)).rename(aside)
          else:
            shutil.move(str(self.directory / str(step)), str(aside))
        distributed.barrier(f"moved aside {self.directory} {step}")
        self._manager = self._open()
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_state(shardings: TrainState, shapes: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the target a checkpoint restores into."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
