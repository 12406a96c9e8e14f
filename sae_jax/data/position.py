"""Where a batch stream stands, for checkpoints: one interface for the host and device streams."""

from __future__ import annotations

from sae_jax.errors import ConfigError


class ServedPosition:
  """``position()`` / ``restore()`` of a stream that counts ``served`` batches of
  ``batch_size`` over ``process_count`` processes. A stream whose every host reads the same
  rows (``is_global``) resumes with any process count; a per-host one only with the same."""

  served: int
  batch_size: int
  process_count: int
  is_global: bool

  def position(self) -> dict:
    return {"served": self.served, "batch_size": self.batch_size,
            "process_count": self.process_count}

  def restore(self, position: dict) -> None:
    if position.get("batch_size", self.batch_size) != self.batch_size:
      raise ConfigError(f"checkpoint was written with batch_size={position['batch_size']}, "
                        f"now {self.batch_size}")
    was = int(position.get("process_count", 1))
    if was != self.process_count and not self.is_global:
      raise ConfigError(f"checkpoint was written by {was} process(es), now {self.process_count}: "
                        "a per-host stream resumes only with the same process count (a cache "
                        "or an array source resumes with any)")
    self.served = int(position["served"])
