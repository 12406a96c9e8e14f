"""Text in, token batches, activations out: sources, grain token pipeline, producer, cache.

    model = sj.load_model(path, revision="step1000")
    rows = sj.data.hook_rows(model, sj.DataConfig(source="hf", path="wiki.jsonl"), "resid_post.11")
    sae = sj.train_sae(rows, sae_cfg, train_cfg, workdir=...)          # stream mode
    sj.data.cache.write_cache(dir, model, sj.data.token_batches(model, data_cfg), hook)
    sae = sj.train_sae(sj.data.cache.CacheReader(dir), sae_cfg, train_cfg)   # cache mode
"""

from __future__ import annotations

import jax

from sae_jax.config import DataConfig
from sae_jax.data.activations import ActivationStream, HookRows, MultiHookRows
from sae_jax.data.sources import load_documents
from sae_jax.data.tokens import TokenBatches, tokenize_documents


def token_batches(model, cfg: DataConfig, process_index: int | None = None,
                  process_count: int | None = None):
  """Documents of ``cfg`` tokenized with the model's tokenizer, as this host's TokenBatches."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  tok = tokenize_documents(load_documents(cfg), model.tokenizer, cfg, model.cfg.vocab_size)
  pad = model.tokenizer.pad_token_id
  return TokenBatches(tok, cfg, pad if pad is not None else 0, p, n)


def activation_stream(model, cfg: DataConfig, hooks):
  """Text -> mixed activation rows for ``hooks`` (iterate; or ``.rows_from(n)``)."""
  return ActivationStream(model, token_batches(model, cfg), hooks, cfg.buffer_batches, cfg.seed)


def hook_rows(model, cfg: DataConfig, hook: str):
  """Text -> [n, D] rows of one hook: pass it straight to ``sj.train_sae`` (stream mode)."""
  return HookRows(activation_stream(model, cfg, [hook]), hook)


def multi_hook_rows(model, cfg: DataConfig, hooks):
  """Text -> {hook: [n, D]} chunks from one forward: ``sj.train_saes`` trains an SAE per hook."""
  return MultiHookRows(activation_stream(model, cfg, hooks))
