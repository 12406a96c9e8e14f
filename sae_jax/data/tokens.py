"""Token batches: tokenize, prepend BOS, truncate or pack, shuffle, shard per host, batch.

Built on a grain ``MapDataset``: batch ``i`` is a pure function of (documents, seed, i), so the
pipeline's checkpoint state is one integer and every host reads only its own slice of rows.
"""

from __future__ import annotations

from typing import NamedTuple

import grain
import numpy as np

from sae_jax.config import DataConfig
from sae_jax.errors import DataError
from sae_jax.languages import LANGUAGE_CODES, SPECIAL, UNKNOWN


class TokenBatch(NamedTuple):
  """[B, T] arrays of one forward batch (``mask`` 1 on real tokens, 0 on padding)."""

  ids: np.ndarray
  mask: np.ndarray
  doc: np.ndarray  # global document index per token (-1 on padding)
  pos: np.ndarray  # position of the token in its document
  language: np.ndarray  # LANGUAGE_CODES of the document (or of the token, for the toy world)


def tokenize_documents(docs: list[dict], tokenizer, cfg: DataConfig, vocab_size: int | None
                       ) -> list[dict]:
  """Token ids per document (BOS first when the model has one), filtered by min_tokens."""
  bos = tokenizer.bos_token_id
  texts = [d["text"] for d in docs]
  enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
  out = []
  top = -1
  for i, (doc, ids) in enumerate(zip(docs, enc)):
    ids = list(ids)
    if bos is not None and (not ids or ids[0] != bos):
      ids = [bos] + ids
    if len(ids) < cfg.min_tokens:
      continue
    top = max(top, max(ids))
    out.append({"ids": np.asarray(ids, np.int32), "doc": i, "meta": doc})
  if not out:
    raise DataError(f"all {len(docs)} documents are shorter than min_tokens={cfg.min_tokens}")
  if cfg.balance:
    out = _balanced(out)
  if vocab_size is not None and top >= vocab_size:
    raise DataError(f"the tokenizer produces id {top} but the model's vocabulary has "
                    f"{vocab_size} entries: tokenizer and model do not match")
  return out


def _balanced(tokenized: list[dict]) -> list[dict]:
  """The same number of documents from every source (the first ones of each, in order)."""
  counts: dict[int, int] = {}
  for d in tokenized:
    counts[d["meta"].get("source", 0)] = counts.get(d["meta"].get("source", 0), 0) + 1
  keep, seen = min(counts.values()), dict.fromkeys(counts, 0)
  out = []
  for d in tokenized:
    s = d["meta"].get("source", 0)
    if seen[s] < keep:
      seen[s] += 1
      out.append(d)
  return out


def _doc_language(meta: dict, ids_len: int) -> np.ndarray:
  labels = meta.get("labels")
  if labels and "language" in labels:  # the toy world's per-token truth
    return np.asarray([LANGUAGE_CODES.get(x, SPECIAL) for x in labels["language"][:ids_len]],
                      np.int8)
  code = LANGUAGE_CODES.get(str(meta.get("language", "")), UNKNOWN)
  return np.full((ids_len,), code, np.int8)


class TokenBatches:
  """Random-access [B, T] batches for this host: ``len(tb)`` batches, ``tb[i]`` is batch i.

  Args:
    tokenized: output of :func:`tokenize_documents`.
    cfg: ctx_len, mode, batch_size, seed.
    pad_id: id used on padding positions.
    process_index, process_count: this host's share. The shuffled rows form ``n_global``
      batches whatever the process count; host p takes global batches p, p + P, p + 2P, ...
      (disjoint, and the same batches a one-process run has), ``n_global // P`` of them so every
      host steps in lockstep. ``global_batch(g)`` reads any global batch (the cache writer
      uses it: there each host writes all of its batches, uneven counts included).
  """

  def __init__(self, tokenized: list[dict], cfg: DataConfig, pad_id: int,
               process_index: int = 0, process_count: int = 1):
    self.cfg, self.pad_id = cfg, pad_id
    rows = self._rows(tokenized, cfg)
    ds = grain.MapDataset.source(rows).seed(cfg.seed).shuffle()
    self.rows_global = len(rows)
    self._rows_ds = ds
    self.process_index, self.process_count = process_index, process_count
    self.n_global = len(ds) // cfg.batch_size
    self._n = self.n_global // process_count
    if self._n == 0:
      raise DataError(f"{len(ds)} sequences make {self.n_global} batches of {cfg.batch_size}, "
                      f"fewer than one per process ({process_count})")

  @staticmethod
  def _rows(tokenized, cfg: DataConfig) -> list[tuple]:
    t = cfg.ctx_len
    if cfg.mode == "truncate":
      return [(d["ids"][:t], np.full(min(len(d["ids"]), t), d["doc"], np.int64),
               np.arange(min(len(d["ids"]), t), dtype=np.int32),
               _doc_language(d["meta"], len(d["ids"]))[:t]) for d in tokenized]
    ids = np.concatenate([d["ids"] for d in tokenized])
    doc = np.concatenate([np.full(len(d["ids"]), d["doc"], np.int64) for d in tokenized])
    pos = np.concatenate([np.arange(len(d["ids"]), dtype=np.int32) for d in tokenized])
    lang = np.concatenate([_doc_language(d["meta"], len(d["ids"])) for d in tokenized])
    n = len(ids) // t
    return [(ids[i * t:(i + 1) * t], doc[i * t:(i + 1) * t], pos[i * t:(i + 1) * t],
             lang[i * t:(i + 1) * t]) for i in range(n)]

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> TokenBatch:
    """This host's batch i: global batch i * P + p."""
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self.global_batch(i * self.process_count + self.process_index)

  def global_batch(self, i: int) -> TokenBatch:
    if not 0 <= i < self.n_global:
      raise IndexError(i)
    b, t = self.cfg.batch_size, self.cfg.ctx_len
    ids = np.full((b, t), self.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    doc = np.full((b, t), -1, np.int64)
    pos = np.zeros((b, t), np.int32)
    lang = np.full((b, t), -1, np.int8)
    for r in range(b):
      row_ids, row_doc, row_pos, row_lang = self._rows_ds[i * b + r]
      n = len(row_ids)
      ids[r, :n], mask[r, :n], doc[r, :n], pos[r, :n] = row_ids, 1, row_doc, row_pos
      lang[r, :len(row_lang)] = row_lang[:n]
    return TokenBatch(ids, mask, doc, pos, lang)
