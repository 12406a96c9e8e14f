"""A faster exact top-k for the XLA CPU backend, built on first use as an XLA FFI custom call.

XLA's CPU TopK partially sorts each row on a single thread (about 2 ns per element here); the
kernel in ``cpu_topk.cc`` scans each row once against a running threshold and splits rows over
XLA's intra-op thread pool. It is compiled with the system C++ compiler into a per-user cache the
first time it is needed. Without a compiler (or with ``SAE_JAX_CPU_TOPK=0``) callers fall back
to XLA's top-k with identical results; GPU and TPU programs always use XLA's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

_SRC = Path(__file__).with_name("cpu_topk.cc")
_TARGET = "sae_jax_cpu_topk"


def _cache_dir() -> Path:
  root = os.environ.get("SAE_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sae_jax")
  return Path(root)


def _cpu_signature() -> str:
  # -march=native code must not be reused on another CPU: key the cache on its flags.
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    flags = ""
  return platform.machine() + flags


def _build() -> Path:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which(
      "clang++")
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  src = _SRC.read_bytes()
  key = hashlib.sha256(src + jax.__version__.encode() + _cpu_signature().encode()).hexdigest()[:16]
  out = _cache_dir() / f"cpu_topk_{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = Path(tmp) / out.name
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}", str(_SRC), "-o", str(tmp_so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"compiling {_SRC.name} failed: {proc.stderr.strip()[-300:]}")
    os.replace(tmp_so, out)  # atomic: a concurrent process sees the old or the new file
  return out


@functools.cache
def available() -> bool:
  """Whether the FFI top-k is built and registered (only ever tried once per process)."""
  if os.environ.get("SAE_JAX_CPU_TOPK", "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.SaeJaxTopK), platform="cpu")
    return True
  except Exception as e:  # any failure means: use lax.top_k, and say so once
    logging.warning("sae_jax: fast CPU top-k unavailable (%s); using lax.top_k", e)
    return False


def ffi_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k semantics for float32 [..., M] -> values, int32 indices [..., k] (CPU only).

  Call only when :func:`available` is True, and only in code compiled for the CPU (wrap it in
  ``lax.platform_dependent`` where the program may run elsewhere).
  """
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32),
                                    jax.ShapeDtypeStruct(shape, jnp.int32)),
                          vmap_method="broadcast_all")
  vals, idx = call(x)
  return vals, idx
