"""The paper's setting (Inaba et al. 2025), as its v1 code (llm-jp/llm-jp-sae at d9eb8c6) did:

- LLM-jp-3-1.8B at six checkpoints; the output of block 12 (``resid_post.11``), the model in
  bfloat16; each token vector divided by its norm ("Scalar" normalisation).
- TopK SAE: 16 x 2048 = 32,768 latents, k = 32, bfloat16 parameters; the encoder a default
  linear layer and the decoder a unit-normalised copy (``encoder_init="linear"``); b_dec the
  geometric median of the first batch (100 Weiszfeld iterations); no dead-latent handling
  (``aux_k=0``); plain Adam updates (``lazy_updates=False``).
- Adam lr 1e-3 (eps 6.25e-10), 1,000 linear warm-up steps then constant, 32,768 tokens a step.
- Data: Japanese and English Wikipedia from two sources, 50/50 (``balance``); sequences of 64
  tokens after BOS (``ctx_len=65``, the BOS position dropped from the activations), shorter
  documents dropped. 165M tokens = 1,289,062 documents a language, shuffled together and split
  0.8 / 0.1 / 0.1: one pass over the 2,062,499 training documents (131,999,936 tokens: 4,028
  steps); the evaluation sets are the documents after them.

``:tiny`` keeps the shapes but trains on a few thousand tokens. Point ``model`` and
``revisions`` at the checkpoints (hub repo and branch names, or a local directory with one
subdirectory per checkpoint) and ``data.path`` at the two Wikipedia dumps (jsonl with a
``text`` field, e.g. llm-jp-corpus-v3's ja_wiki and en_wiki files).
"""

import ml_collections

from sae_jax.cli import add_study_settings

DOCS_PER_LANGUAGE = 165_000_000 // (2 * 64)  # 1,289,062
TRAIN_DOCS = int(2 * DOCS_PER_LANGUAGE * 0.8)  # 2,062,499
TRAIN_STEPS = TRAIN_DOCS * 64 // 32768  # 4,028


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.model = "llm-jp/llm-jp-3-1.8b"
  c.toy = False
  c.toy_size = "default"
  c.revisions = ("step10", "step100", "step1000", "step10000", "step100000", "step988240")
  c.hooks = ("resid_post.11",)
  c.expansion = 16  # 2048 * 16 = 32,768 latents
  c.sae = dict(architecture="topk", d_in=2048, d_sae=32768, k=32, normalize="unit_norm",
               param_dtype="bfloat16", compute_dtype="bfloat16")
  c.train = dict(batch_size=32768, total_tokens=32768 * (4 if tiny else TRAIN_STEPS),
                 eval_tokens=32768, aux_k=0, geometric_median_iters=100, encoder_init="linear",
                 lazy_updates=False,  # plain Adam, as the paper
                 update_blocks=1,  # --config.train.update_blocks=16: see README "Planning"
                 optim=dict(lr=1e-3, warmup_steps=1000, lr_schedule="constant",
                            adam_eps=6.25e-10),
                 run=dict(log_every=100, checkpoint_every=1000))
  c.data = dict(source="hf", path=("ja_wiki.jsonl", "en_wiki.jsonl"), text_field="text",
                source_languages=("ja", "en"), balance=True, ctx_len=65, min_tokens=65,
                mode="truncate", batch_size=64, buffer_batches=64,
                max_docs=20_000 if tiny else TRAIN_DOCS)
  return add_study_settings(c, analysis_eval_tokens=5_000 if tiny else 1_000_000,
                            exports=("llm_jp_sae", "sae_lens"), eval_batches=8, dtype="bfloat16")
