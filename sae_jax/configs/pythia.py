"""A Pythia checkpoint series (EleutherAI publishes 154 revisions per model): resid_post at the
middle block of Pythia-160m over log-spaced steps. ``:tiny`` trains on a few thousand tokens."""

import ml_collections

from sae_jax.cli import add_study_settings


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.model = "EleutherAI/pythia-160m"
  c.toy = False
  c.toy_size = "default"
  c.revisions = ("step0", "step16", "step128", "step1000", "step8000", "step64000",
                 "step143000")
  c.hooks = ("resid_post.5",)
  c.expansion = 16
  c.sae = dict(architecture="topk", d_in=768, d_sae=12288, k=32, normalize="expected_norm")
  c.train = dict(batch_size=4096, total_tokens=4096 * (4 if tiny else 20_000), eval_tokens=8192,
                 encoder_init="linear", lazy_updates=False,
                 optim=dict(lr=None, warmup_steps=1000), run=dict(log_every=100))
  c.data = dict(source="hf", path="text.jsonl", ctx_len=128, mode="pack", batch_size=32,
                buffer_batches=32, max_docs=2000 if tiny else None)
  return add_study_settings(c, analysis_eval_tokens=5_000 if tiny else 200_000,
                            exports=("sae_lens", "sparsify"), eval_batches=8)
