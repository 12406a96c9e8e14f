"""A faster exact top-k for the XLA CPU backend, built on first use as an XLA FFI custom call.

XLA's CPU TopK partially sorts each row on a single thread (about 2 ns per element here); the
kernel in ``cpu_topk.cc`` scans each row once against a running threshold and splits rows over
XLA's intra-op thread pool. It is compiled with the system C++ compiler into a per-user cache
the first time it is needed (``cpu_ffi``). Without a compiler (or with ``SAE_JAX_CPU_TOPK=0``)
callers fall back to XLA's top-k with identical results; GPU and TPU programs always use XLA's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.kernels import cpu_ffi

_TARGET = "sae_jax_cpu_topk"
_MASKED_TARGET = "sae_jax_cpu_masked_topk"


def available() -> bool:
  """Whether the FFI top-k is built and registered (False with ``SAE_JAX_CPU_TOPK=0``)."""
  return cpu_ffi.register("SAE_JAX_CPU_TOPK",
                          {_TARGET: "SaeJaxTopK", _MASKED_TARGET: "SaeJaxMaskedTopK"})


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


def ffi_masked_top_k(x: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """:func:`ffi_top_k` of ``where(mask, x, -inf)`` without forming it: float32 [..., M], bool
  [M] -> values, int32 indices [..., k] (CPU only, as :func:`ffi_top_k`)."""
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(_MASKED_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32),
                                           jax.ShapeDtypeStruct(shape, jnp.int32)),
                          vmap_method="sequential")  # the mask is not batched with x
  vals, idx = call(x, mask.astype(bool))
  return vals, idx
