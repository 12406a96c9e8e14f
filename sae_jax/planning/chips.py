"""Accelerators the planner knows: their published peak figures and their topologies.

TPU topologies come from libtpu (``jax.experimental.topologies``): device descriptions of a
slice, enough to compile for it on a plain CPU host. GPUs are only estimated (nothing is
compiled for them here): their figures come from the table and from a TPU proxy of the same
device count (see :mod:`sae_jax.planning.planner`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from sae_jax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip peaks: dense bf16 FLOP/s, HBM bytes and bytes/s, and the
  interconnect's one-way bytes/s per chip (ICI for TPUs, NVLink for GPUs)."""

  name: str
  bf16_flops: float
  hbm_bytes: float
  hbm_bw: float
  link_bw: float
  cores_per_chip: int = 1


# Sources (per chip, dense bf16, no sparsity):
#   v4:  cloud.google.com/tpu/docs/v4 -- 275 TFLOPs, 32 GiB HBM2 at 1,200 GBps, 2 TensorCores;
#        ICI 6 links x 50 GBps (Jouppi et al., ISCA 2023) -> 300 GBps counted one way.
#   v5e: cloud.google.com/tpu/docs/v5e -- 197 TFLOPs, 16 GB HBM2 at 819 GBps, ICI 1,600 Gbps.
#   v5p: cloud.google.com/tpu/docs/v5p -- 459 TFLOPs, 95 GB HBM2e at 2,765 GBps, ICI 4,800 Gbps.
#   v6e: cloud.google.com/tpu/docs/v6e -- 918 TFLOPs, 32 GB HBM at 1,640 GBps, ICI 3,584 Gbps.
#   H100 SXM: nvidia.com/en-us/data-center/h100 (datasheet) -- 989 TFLOPS bf16 dense (1,979
#        with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions).
#   H200 SXM: nvidia.com/en-us/data-center/h200 -- 989 TFLOPS, 141 GB HBM3e at 4.8 TB/s, 900 GB/s.
#   A100 SXM 80GB: nvidia.com/en-us/data-center/a100 -- 312 TFLOPS, 80 GB HBM2e at 2,039 GB/s,
#        NVLink 600 GB/s.
TPUS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1200e9, 300e9, cores_per_chip=2),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, 1600e9 / 8),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2765e9, 4800e9 / 8, cores_per_chip=2),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1640e9, 3584e9 / 8),
}
GPUS = {
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 450e9),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9, 4.8e12, 450e9),
    "a100": Chip("NVIDIA A100 SXM 80GB", 312e12, 80e9, 2.039e12, 300e9),
}
# Share of HBM a program may fill (the runtime and the allocator keep the rest).
USABLE_HBM = 0.95
EXAMPLES = "v5e:2x2, v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x4, h100:8"
_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_NAME = re.compile(r"^(h100|h200|a100):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """What a plan compiles for: ``devices`` (TPU device descriptions, a proxy for GPUs), the
  chip, and how many chips the devices are (a v4 device is one of a chip's 2 TensorCores)."""

  name: str
  chip: Chip
  devices: tuple
  chips: float
  estimate: bool

  @property
  def per_device(self) -> Chip:
    """The chip's figures scaled to one device (a v4 TensorCore: half a chip)."""
    f = self.chips / len(self.devices)
    c = self.chip
    return dataclasses.replace(c, bf16_flops=c.bf16_flops * f, hbm_bytes=c.hbm_bytes * f,
                               hbm_bw=c.hbm_bw * f, link_bw=c.link_bw * f)


def require_libtpu() -> None:
  """Refuse in one line when libtpu (the ``tpu`` extra) is not installed."""
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError("planning compiles for TPU and needs libtpu: pip install 'sae_jax[tpu]' "
                      "(jax[tpu] at the installed jax version)")


def tpu_devices(name: str) -> tuple:
  """TPU device descriptions of topology ``name`` (e.g. ``v5e:4x4``), compiled for on this host."""
  require_libtpu()
  # Compiling against a topology needs no TPU, but libtpu takes a per-machine lock unless told
  # that several processes may load it (tests, or a second planner, run side by side).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return tuple(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # libtpu's own message names the constraint (host bounds, ...)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"libtpu cannot build topology {name!r} ({msg[:200]}); try e.g. "
                      f"{EXAMPLES}") from None


def resolve_target(name: str) -> Target:
  """``v5e:4x4``-style TPU topologies (compiled for) or ``h100:8``-style GPU counts (estimated
  through a TPU proxy with as many devices)."""
  tpu, gpu = _TPU_NAME.match(name or ""), _GPU_NAME.match(name or "")
  if tpu:
    devices = tpu_devices(name)
    chip = TPUS[tpu.group(1)]
    cores = getattr(devices[0], "num_cores", 1) or 1
    return Target(name, chip, devices, len(devices) * cores / chip.cores_per_chip, False)
  if gpu:
    n = int(gpu.group(2))
    if n < 1 or n & (n - 1):
      raise ConfigError(f"topology {name!r}: a GPU count must be a power of two (1, 2, 4, 8, "
                        "...)")
    return Target(name, GPUS[gpu.group(1)], tpu_devices(_proxy(n))[:n], n, True)
  raise ConfigError(f"unknown topology {name!r}; allowed: <v4|v5e|v5p|v6e>:<AxB[xC]> (TPU "
                    f"slices, e.g. {EXAMPLES}) or <h100|h200|a100>:<count> (GPU estimates)")


def _proxy(n: int) -> str:
  """A v5p topology with at least n devices (whole chips; libtpu's smallest slice is 4)."""
  dims = [2, 2, 1]
  i = 2
  while dims[0] * dims[1] * dims[2] < n:
    dims[i] *= 2
    i = (i - 1) % 3
  return "v5p:" + "x".join(map(str, dims))
