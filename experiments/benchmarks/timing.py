"""Timing and step set-up shared by the benchmark scripts (imported as a sibling: scripts run
from this folder)."""

import time


def call_seconds(fn, steps: int) -> list[float]:
  """Sorted seconds of ``steps`` calls of ``fn`` (its result blocked on) after two warm-ups."""
  import jax
  for _ in range(2):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)


def lower_quartile(times: list[float]) -> float:
  """The lower quartile of sorted ``times``: robust to a noisy neighbour."""
  return times[len(times) // 4]


def lower_quartile_seconds(fn, steps: int) -> float:
  """Lower-quartile seconds per call of ``fn``."""
  return lower_quartile(call_seconds(fn, steps))


def dead_marker(m: int, fraction: float, dead_tokens: int):
  """A jitted state -> state that keeps the first ``fraction`` of ``m`` latents dead (their
  tokens_since_fired at ``dead_tokens``), as the peer harness keeps the same latents dead on
  every step; in a real run they would fire again and AuxK would switch off. Donates the state."""
  import jax
  import jax.numpy as jnp
  dead = jnp.arange(m) < int(m * fraction)
  return jax.jit(lambda s: s.replace(tokens_since_fired=jnp.where(
      dead, dead_tokens, s.tokens_since_fired)), donate_argnums=0)
