"""The evaluation set: fixed token sequences, the same for every checkpoint, with metadata.

Held out from training: the toy world draws documents with a seed of its own; other sources
give the documents after the first ``max_docs`` the trace trained on; per token it carries the document, the position, the language code of
the document or, for the toy world, of the token itself (``sae_jax.languages.LANGUAGE_CODES``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from absl import logging

from sae_jax.config import DataConfig
from sae_jax.data.cache import tokenizer_fingerprint
from sae_jax.data.sources import load_documents
from sae_jax.data.tokens import TokenBatches, tokenize_documents
from sae_jax.errors import DataError

EVAL_SEED_OFFSET = 104_729  # keeps the evaluation draw away from the training draws


@dataclasses.dataclass
class EvalSet:
  """[S, T] arrays of the evaluation sequences (``mask`` 1 on tokens that count)."""

  ids: np.ndarray
  mask: np.ndarray
  doc: np.ndarray
  language: np.ndarray
  attn: np.ndarray  # [S, T] real tokens (specials included), False on padding
  token_text: list[str]  # token id -> text, from the tokenizer
  tokenizer_fingerprint: str

  @property
  def n_tokens(self) -> int:
    return int(self.mask.sum())

  def batches(self, seqs_per_batch: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first sequence index, ids [b, T], mask [b, T]) in order."""
    for s in range(0, self.ids.shape[0], seqs_per_batch):
      yield s, self.ids[s:s + seqs_per_batch], self.mask[s:s + seqs_per_batch]


def build_eval_set(model, data_cfg: DataConfig, n_tokens: int, seed_offset: int = EVAL_SEED_OFFSET
                   ) -> EvalSet:
  """About ``n_tokens`` counted tokens (BOS / pad / specials excluded) of held-out sequences."""
  if data_cfg.source == "toy":  # a draw of its own seed: documents training never saw
    cfg = data_cfg.replace(seed=data_cfg.seed + seed_offset, batch_size=1,
                           max_docs=max(8, n_tokens // 4))
    docs = load_documents(cfg)
  else:
    # Training reads the first max_docs documents: take the ones after them.
    cfg = data_cfg.replace(seed=data_cfg.seed + seed_offset, batch_size=1)
    skip = data_cfg.max_docs or 0
    extra = max(64, 2 * n_tokens // max(data_cfg.ctx_len, 1))
    docs = load_documents(cfg.replace(max_docs=skip + extra))[skip:]
    if not skip:
      logging.warning("the trace trains on every document of %s; the evaluation set overlaps "
                      "its training text (set data.max_docs to hold some out)", data_cfg.path)
    if not docs:
      raise DataError(f"no documents of {data_cfg.path!r} are left after the {skip} the trace "
                      "trained on; the evaluation set needs held-out documents")
  tok = tokenize_documents(docs, model.tokenizer, cfg, model.cfg.vocab_size)
  pad = model.tokenizer.pad_token_id
  tb = TokenBatches(tok, cfg, pad if pad is not None else 0, 0, 1)
  special = np.asarray(sorted(set(model.tokenizer.all_special_ids)), np.int64)
  parts, have = [], 0
  for i in range(tb.n_global):
    b = tb.global_batch(i)
    mask = b.mask.astype(bool) & ~np.isin(b.ids, special)
    parts.append((b.ids, mask, b.doc, b.language, b.mask.astype(bool)))
    have += int(mask.sum())
    if have >= n_tokens:
      break
  if not parts or have == 0:
    raise DataError(f"the evaluation draw of {data_cfg.source} {data_cfg.path!r} has no tokens")
  ids, mask, doc, lang, attn = (np.concatenate([p[j] for p in parts]) for j in range(5))
  vocab = model.tokenizer.convert_ids_to_tokens(list(range(len(model.tokenizer))))
  vocab += [""] * max(0, model.cfg.vocab_size - len(vocab))
  return EvalSet(ids.astype(np.int32), mask, doc, lang.astype(np.int8), attn,
                 [t if t is not None else "" for t in vocab],
                 tokenizer_fingerprint(model.tokenizer))
