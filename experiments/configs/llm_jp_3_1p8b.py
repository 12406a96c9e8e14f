"""The paper's setting (Inaba et al. 2025): LLM-jp-3-1.8B, six checkpoints, layer 12
(resid_post.11), TopK SAEs with 32,768 latents and k=32 on unit-norm inputs, Adam lr 1e-3,
1,000 warm-up steps then constant, 32,768 tokens per step, the first 64 tokens of Japanese and
English Wikipedia articles. ``:tiny`` keeps the shapes but trains on a few thousand tokens.

Set ``model`` and ``revisions`` to where the intermediate checkpoints are (hub repo and branch
names, or a local directory with one subdirectory per checkpoint), and ``data.path`` to a
Wikipedia dump with a ``language`` column (e.g. a local jsonl/parquet mix of ja and en).
"""

import ml_collections

from sae_jax.cli import add_study_settings


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.model = "llm-jp/llm-jp-3-1.8b"
  c.toy = False
  c.toy_size = "default"
  c.revisions = ("step10", "step100", "step1000", "step10000", "step100000", "step988240")
  c.hooks = ("resid_post.11",)
  c.expansion = 16  # 2048 * 16 = 32,768 latents
  c.sae = dict(architecture="topk", d_in=2048, d_sae=32768, k=32, normalize="unit_norm")
  c.train = dict(batch_size=32768, total_tokens=(32768 * 4) if tiny else 32768 * 30_000,
                 eval_tokens=32768,
                 optim=dict(lr=1e-3, warmup_steps=1000, lr_schedule="constant", adam_eps=6.25e-10),
                 run=dict(log_every=100, checkpoint_every=1000))
  c.data = dict(source="hf", path="wikipedia_ja_en.jsonl", text_field="text",
                meta_fields=("language",), ctx_len=64, mode="truncate", batch_size=64,
                buffer_batches=64, max_docs=20_000 if tiny else None)
  return add_study_settings(c, analysis_eval_tokens=5_000 if tiny else 1_000_000,
                            exports=("llm_jp_sae", "sae_lens"), eval_batches=8, dtype="bfloat16")
