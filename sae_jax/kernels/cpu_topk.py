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
_BIAS_TARGET = "sae_jax_cpu_bias_topk"
_MASKED_TARGET = "sae_jax_cpu_masked_topk"


def available() -> bool:
  """Whether the FFI top-k is built and registered (False with ``SAE_JAX_CPU_TOPK=0``)."""
  return cpu_ffi.register("SAE_JAX_CPU_TOPK",
                          {_TARGET: "SaeJaxTopK", _BIAS_TARGET: "SaeJaxBiasTopK",
                           _MASKED_TARGET: "SaeJaxMaskedTopK"})


def ffi_top_k(x: jax.Array, k: int, bias: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """lax.top_k semantics for float32 [..., M] (plus bias [M], when given, added in float32 as
  ``x + bias`` would) -> values, int32 indices [..., k] (CPU only).

  Call only when :func:`available` is True, and only in code compiled for the CPU (wrap it in
  ``lax.platform_dependent`` where the program may run elsewhere).
  """
  shape = x.shape[:-1] + (k,)
  out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
  if bias is None:
    return tuple(jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x))
  # "sequential": the bias is not batched with x.
  return tuple(jax.ffi.ffi_call(_BIAS_TARGET, out, vmap_method="sequential")(
      x, bias.astype(jnp.float32)))


def ffi_masked_top_k(x: jax.Array, mask: jax.Array, k: int, bias: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """:func:`ffi_top_k` of ``where(mask, x (+ bias), -inf)`` without forming it: float32 [..., M],
  bool [M], float32 [M] or None -> values, int32 indices [..., k] (CPU only, as :func:`ffi_top_k`)."""
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(_MASKED_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32),
                                           jax.ShapeDtypeStruct(shape, jnp.int32)),
                          vmap_method="sequential")  # the mask is not batched with x
  bias = jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  vals, idx = call(x, bias, mask.astype(bool))
  return vals, idx
