"""Build and register the C++ XLA FFI kernels of the CPU backend (``cpu_*.cc``) on first use.

All sources (``cpu_topk.cc``, ``cpu_rows.cc`` and their header ``cpu_ffi.h``) compile with the
system C++ compiler into one shared library, cached per user and keyed on the sources, the jax
version and the CPU's flags. Each kernel family registers its targets through :func:`register`,
and is off (callers fall back to XLA's ops, same results) when its environment switch is ``0``
or when the library cannot be built. GPU and TPU programs never see these targets.
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
from absl import logging

_DIR = Path(__file__).parent
_SOURCES = ("cpu_topk.cc", "cpu_rows.cc")
_HEADERS = ("cpu_ffi.h",)


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
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
  text = b"".join((_DIR / name).read_bytes() for name in _SOURCES + _HEADERS)
  key = hashlib.sha256(text + " ".join([jax.__version__, *flags]).encode()
                       + _cpu_signature().encode()).hexdigest()
  out = _cache_dir() / f"cpu_kernels_{key[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = Path(tmp) / out.name
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", f"-I{_DIR}",
           *(str(_DIR / s) for s in _SOURCES), "-o", str(tmp_so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"compiling {', '.join(_SOURCES)} failed: {proc.stderr.strip()[-300:]}")
    os.replace(tmp_so, out)  # atomic: a concurrent process sees the old or the new file
  return out


@functools.cache
def _library() -> ctypes.CDLL | Exception:
  """The loaded library, or why it could not be built (tried once per process)."""
  try:
    return ctypes.cdll.LoadLibrary(str(_build()))
  except Exception as e:  # noqa: BLE001 (reported by each family that needs it)
    return e


@functools.cache
def _register(targets: tuple[tuple[str, str], ...]) -> bool:
  try:
    lib = _library()
    if isinstance(lib, Exception):
      raise lib
    for target, symbol in targets:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    return True
  except Exception as e:  # any failure means: use XLA's ops, and say so once per family
    logging.warning("sae_jax: CPU FFI kernels %s unavailable (%s); using XLA's ops",
                    [t for t, _ in targets], e)
    return False


def register(switch: str, targets: dict[str, str]) -> bool:
  """Whether the FFI targets {name: symbol} are registered for the CPU (built at most once).

  False when the environment variable ``switch`` is ``0`` (read on every call, so a program
  traced later can switch off) or when the library cannot be built or loaded.
  """
  if os.environ.get(switch, "1") == "0":
    return False
  return _register(tuple(sorted(targets.items())))
