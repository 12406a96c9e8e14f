"""Write an activation cache: python cache_script.py TOY_DIR CACHE_DIR PROCESS_INDEX PROCESS_COUNT."""
import sys

from absl import logging

import sae_jax as sj
from sae_jax.config import DataConfig
from sae_jax.data.cache import write_cache
from sae_jax.data.sources import load_documents
from sae_jax.data.tokens import TokenBatches, tokenize_documents

CFG = DataConfig(source="toy", max_docs=512, batch_size=16, ctx_len=24)


def batches_for(toy, p, n):
  model = sj.load_model(toy, revision="step30")
  cfg = CFG.replace(path=str(toy))
  tok = tokenize_documents(load_documents(cfg), model.tokenizer, cfg, model.cfg.vocab_size)
  return model, TokenBatches(tok, cfg, model.tokenizer.pad_token_id, p, n)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  toy, out, p, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  model, batches = batches_for(toy, p, n)
  write_cache(out, model, batches, "resid_post.1", "float32", p, n, log_fn=lambda s: None)
