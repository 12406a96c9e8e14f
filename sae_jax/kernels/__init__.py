"""Fused top-k encode and sparse decode with sparse gradients."""

from sae_jax.kernels.topk import (TopKCodes, kth_largest_nonneg, owned_rows, select_topk,
                                  shard_offset, sparse_decode, topk_encode)

__all__ = ["TopKCodes", "kth_largest_nonneg", "owned_rows", "select_topk", "shard_offset", "sparse_decode", "topk_encode"]
