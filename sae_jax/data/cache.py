"""An activation cache on disk or in a bucket (tensorstore zarr3; ``gcs`` driver for gs://):
extract once, train many SAEs.

Layout of ``<dir>``::

    meta.json          what was cached (model, revision, hook, dtype, normalisation, tokenizer,
                       d_model, rows per batch, number of batches): a reader refuses a mismatch
    acts/              zarr3 [n_batches * B*T, D] (float32 or bfloat16), one chunk per batch
    token/ doc/ pos/ language/   zarr3 [n_batches * B*T] per-row metadata
    manifest.<p>.json  batches finished by process p with their row counts (atomic rewrites)

Global batch ``i`` of the token pipeline occupies rows [i*B*T, i*B*T + n_i); process p writes
global batches p, p + P, ... (the same batches whatever P, so the cache does not depend on the
number of writers), so hosts write in parallel without coordination, and a
killed writer resumes with the batches its manifest lacks. The cache is complete when the
manifests cover every batch. Rows are raw activations (normalisation happens in the SAE).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from sae_jax import paths, store
from sae_jax.data.activations import batch_rows
from sae_jax.data.tokens import TokenBatches
from sae_jax.errors import CheckpointError, DataError

FORMAT_VERSION = 1
_META_FIELDS = ("token", "doc", "pos", "language")
_META_DTYPES = {"token": "int32", "doc": "int64", "pos": "int32", "language": "int8"}


def tokenizer_fingerprint(tokenizer) -> str:
  vocab = sorted(tokenizer.get_vocab().items())
  return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def cache_meta(model, hook: str, dtype: str, batches: TokenBatches, process_count: int) -> dict:
  """What a cache of ``hook`` under these settings records (and what a reader checks)."""
  return {"format_version": FORMAT_VERSION, "model": paths.origin(model.path),
          "revision": model.revision,
          "hook": hook, "dtype": dtype, "normalisation": "none",
          "tokenizer": tokenizer_fingerprint(model.tokenizer), "d_model": model.cfg.d_model,
          "rows_per_batch": batches.cfg.batch_size * batches.cfg.ctx_len,
          "n_batches": batches.n_global, "process_count": process_count,
          "data": batches.cfg.to_dict()}


def _open(path: Path, name: str, shape, dtype: str, chunk_rows: int, create: bool):
  import tensorstore as ts
  spec = {"driver": "zarr3", "kvstore": paths.ts_kvstore(path / name)}  # file or gcs
  if create:
    spec["metadata"] = {"shape": list(shape), "data_type": dtype, "chunk_grid": {
        "name": "regular", "configuration": {"chunk_shape": [chunk_rows] + list(shape[1:])}}}
  try:
    return ts.open(spec, create=create, open=True).result()
  except Exception as e:
    raise CheckpointError(f"cannot open cache array {path / name}: {str(e)[:200]}") from None


def _manifest(path: Path, p: int) -> Path:
  return path / f"manifest.{p}.json"


def finished_batches(path: Path) -> dict[int, int]:
  """batch index -> rows, over every process's manifest."""
  out = {}
  for f in paths.as_path(path).glob("manifest.*.json"):
    out.update({int(k): v for k, v in store.read_json(f).items()})
  return out


def write_cache(path: str | Path, model, batches: TokenBatches, hook: str, dtype: str = "bfloat16",
                process_index: int = 0, process_count: int = 1, log_fn=print) -> dict:
  """Extract ``hook`` activations for this host's batches into the cache at ``path``.

  Resumable: batches already in this process's manifest are skipped. Returns meta.json.
  """
  if dtype not in ("float32", "bfloat16"):
    raise DataError(f"cache dtype={dtype!r}; allowed: 'float32', 'bfloat16'")
  path = paths.as_path(path)
  meta = cache_meta(model, hook, dtype, batches, process_count)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if (path / "meta.json").exists():
      _check_meta(path, store.read_json(path / "meta.json"), meta)
    else:
      store.atomic_write_json(path / "meta.json", meta)
  except OSError as e:
    raise DataError(f"cannot write the activation cache at {path}: {e.strerror or e}") from None
  n_rows = meta["n_batches"] * meta["rows_per_batch"]
  rpb = meta["rows_per_batch"]
  acts = _open(path, "acts", (n_rows, meta["d_model"]), dtype, rpb, create=True)
  cols = {f: _open(path, f, (n_rows,), _META_DTYPES[f], rpb, create=True) for f in _META_FIELDS}
  mine_file = _manifest(path, process_index)
  done = {int(k): v for k, v in store.read_json(mine_file).items()} if mine_file.exists() else {}
  special = set(model.tokenizer.all_special_ids)
  np_dtype = np.dtype(dtype) if dtype == "float32" else _bf16()
  t0, written = time.perf_counter(), 0
  mine = range(process_index, batches.n_global, process_count)  # disjoint across processes
  for local, global_index in enumerate(mine):
    if global_index in done:
      continue
    rows = batch_rows(model, batches.global_batch(global_index), [hook], special)
    n = len(rows.token)
    lo = global_index * rpb
    futures = [acts[lo:lo + n].write(rows.acts[hook].astype(np_dtype))]
    futures += [cols[f][lo:lo + n].write(getattr(rows, f).astype(_META_DTYPES[f]))
                for f in _META_FIELDS]
    try:
      for fut in futures:
        fut.result()
    except Exception as e:
      raise DataError(f"writing the activation cache at {path} failed (disk full or "
                      f"unwritable?): {str(e)[:200]}") from None
    done[global_index] = n
    written += n
    store.atomic_write_json(mine_file, {str(k): v for k, v in sorted(done.items())})
    if (local + 1) % 50 == 0:
      log_fn(f"cache {path.name}: {local + 1}/{len(mine)} batches, "
             f"{written / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
  return meta


def _bf16():
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16)


def _check_meta(path: Path, found: dict, wanted: dict) -> None:
  keys = ("model", "revision", "hook", "dtype", "tokenizer", "d_model", "rows_per_batch",
          "n_batches", "normalisation")
  diffs = [f"{k}: cached {found.get(k)!r}, asked {wanted.get(k)!r}" for k in keys
           if k in wanted and found.get(k) != wanted.get(k)]
  if diffs:
    raise CheckpointError(f"activation cache {path} does not match: " + "; ".join(diffs))


class CacheReader:
  """Rows of a complete cache, read back batch-chunk by batch-chunk in a shuffled order.

  Iterating yields [n_i, D] float32 arrays (chunk order from ``seed``, the next chunk's read
  in flight while the current one is consumed); ``rows_from`` restarts at any row, so
  ``train_sae`` resumes exactly from a cache too. ``expect`` is checked against meta.json.
  Every host of a multi-host run reads the same rows (``global_rows``) and trains on its slice
  of each global batch, so a cache trains the same SAE on any number of processes.
  """

  global_rows = True

  def __init__(self, path: str | Path, expect: dict | None = None, seed: int = 0):
    self.path = paths.as_path(path)
    if not (self.path / "meta.json").exists():
      raise CheckpointError(f"no activation cache at {self.path} (meta.json missing)")
    self.meta = store.read_json(self.path / "meta.json")
    if expect:
      _check_meta(self.path, self.meta, expect)
    self.done = finished_batches(self.path)
    missing = self.meta["n_batches"] - len(self.done)
    if missing:
      raise CheckpointError(f"activation cache {self.path} is incomplete: {missing} of "
                            f"{self.meta['n_batches']} batches missing; rerun the extraction")
    rpb = self.meta["rows_per_batch"]
    n_rows = self.meta["n_batches"] * rpb
    self._acts = _open(self.path, "acts", (n_rows, self.meta["d_model"]), self.meta["dtype"],
                       rpb, create=False)
    self.order = np.random.default_rng([seed, 11]).permutation(self.meta["n_batches"])

  def __len__(self) -> int:
    return sum(self.done.values())

  def read_batch(self, i: int) -> np.ndarray:
    lo = i * self.meta["rows_per_batch"]
    return np.asarray(self._acts[lo:lo + self.done[i]].read().result(), np.float32)

  def read_meta(self, field: str, i: int) -> np.ndarray:
    rpb = self.meta["rows_per_batch"]
    col = _open(self.path, field, (self.meta["n_batches"] * rpb,), _META_DTYPES[field], rpb,
                create=False)
    return np.asarray(col[i * rpb:i * rpb + self.done[i]].read().result())

  def __iter__(self) -> Iterator[np.ndarray]:
    return self.rows_from(0)

  def rows_from(self, start: int) -> Iterator[np.ndarray]:
    seen, pending = 0, None
    for i in self.order:
      n = self.done[int(i)]
      if seen + n <= start:
        seen += n
        continue
      lo = int(i) * self.meta["rows_per_batch"]
      fut = self._acts[lo:lo + n].read()  # prefetch: issue before consuming the previous
      if pending is not None:
        yield pending
      skip = max(start - seen, 0)
      pending = np.asarray(fut.result(), np.float32)[skip:]
      seen += n
    if pending is not None:
      yield pending


class MultiCacheReader:
  """Several hooks' caches of the same tokens read side by side: {hook: rows} chunks.

  The caches must come from one extraction setting (same batches and seed), so their chunks
  hold the same tokens in the same order; ``sj.train_saes`` then trains an SAE per hook.
  """

  global_rows = True

  def __init__(self, readers: dict[str, CacheReader]):
    if not readers:
      raise DataError("MultiCacheReader needs at least one cache")
    self.readers = readers
    first = next(iter(readers.values()))
    for hook, r in readers.items():
      if r.done != first.done or list(r.order) != list(first.order):
        raise DataError(f"cache of {hook} at {r.path} holds other tokens than {first.path}; "
                        "extract every hook with the same data settings")

  def __iter__(self):
    return self.rows_from(0)

  def rows_from(self, start: int):
    streams = {h: r.rows_from(start) for h, r in self.readers.items()}
    for chunks in zip(*streams.values()):
      yield dict(zip(streams, chunks))
