"""The toy world's trace (the README's main command). ``--config=experiments/configs/toy.py:tiny``
is the seconds-long variant."""

import ml_collections

from sae_jax.cli import add_study_settings


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.model = "toy_model"  # relative paths are taken inside --workdir
  c.toy = True
  c.toy_size = "tiny" if tiny else "default"
  c.revisions = ()  # every checkpoint the toy run saved, in training order
  c.hooks = ("resid_post.1",) if not tiny else ("resid_post.0",)
  # Latents well below the vocabulary, as in the paper (32,768 for 99,584 tokens, about 1/3):
  # 5 x 64 = 320 latents for the default world's 927 words.
  c.expansion = 8 if tiny else 5
  c.sae = dict(architecture="topk", d_in=1, d_sae=8, k=8, normalize="unit_norm")
  # Enough tokens that FVU and dead fraction flatten (analysis/plots/training_curves.png); the
  # dead window is a sixth of training, so the dead fraction is measured (and AuxK revives
  # latents) through it.
  c.train = dict(batch_size=1024, total_tokens=(40 if tiny else 300) * 1024, eval_tokens=2048,
                 dead_tokens=200_000 if tiny else 50_000, encoder_init="linear",
                 lazy_updates=False,
                 optim=dict(lr=2e-3, warmup_steps=20),
                 run=dict(log_every=20, checkpoint_every=1000))
  c.data = dict(source="toy", path="toy_model", max_docs=2500 if tiny else 15000, ctx_len=48,
                batch_size=64, buffer_batches=16)
  add_study_settings(c, analysis_eval_tokens=5_000 if tiny else 20_000,
                     exports=("sae_lens", "llm_jp_sae"), eval_batches=2 if tiny else 4)
  # A second init seed at every checkpoint: the overlap at checkpoint t is read against the
  # seed-to-seed overlap at t, and the match threshold is calibrated on those pairs.
  c.seed_baseline = ("every",)
  return c
