"""The ground truth can now disagree with the paper's rule (a Latin loanword in Japanese text),
and the findings' verdicts follow from their numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.analysis import AnalysisConfig, EvalSet, feature_stats, label_features
from sae_jax.analysis.findings import newcombe_difference, spearman, verdicts
from sae_jax.languages import LANGUAGE_CODES
from sae_jax.toy.lm import TINY_WORLD, encode
from sae_jax.toy.world import World


def test_paper_rule_calls_a_loanword_in_japanese_text_english_and_the_truth_does_not():
  world = World(TINY_WORLD)
  docs = [d for d in world.documents(200, 9) if d.doc_type == "ja"]
  loans = {w for d in docs for w, lang in zip(d.tokens, d.language)
           if lang == "ja" and w.isascii() and w in world.shared_forms and not w.isdigit()}
  assert loans  # names and loanwords stand in Japanese sentences, in Latin script
  ids, mask = encode(world, docs, max(len(d.tokens) for d in docs))
  lang = np.full(ids.shape, LANGUAGE_CODES["special"], np.int8)
  for r, d in enumerate(docs):
    lang[r, :len(d.tokens)] = [LANGUAGE_CODES[x] for x in d.language]
  ev = EvalSet(ids, mask.astype(bool) & (ids != world.word_index["<bos>"]),
               np.repeat(np.arange(len(docs))[:, None], ids.shape[1], 1), lang,
               mask.astype(bool), list(world.vocab), "test")
  # Feature 0 fires on the Latin-script shared words only; feature 1 on the kana word "は".
  v = len(world.vocab)
  w_enc = np.zeros((v, 2), np.float32)
  w_enc[[world.word_index[w] for w in loans], 0] = 1.0
  w_enc[world.word_index["は"], 1] = 1.0
  cfg = sj.SAEConfig(architecture="topk", d_in=v, d_sae=2, k=2, normalize="none")
  sae = sj.SAE(cfg, {"W_enc": jnp.asarray(w_enc), "b_enc": jnp.zeros(2),
                     "W_dec": jnp.asarray(w_enc.T), "b_dec": jnp.zeros(v)},
               {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})
  st, _, _ = feature_stats(sae, ev, lambda x: np.eye(v, dtype=np.float32)[x],
                           AnalysisConfig(seqs_per_batch=64))
  labels = label_features(st, ev.ids, ev.token_text, ev.language, None, mask=ev.mask)
  assert labels.by_paper_rule and labels.n_en[0] > 0
  assert labels.language[0] == "en" and labels.language_script[0] == "en"  # the script says so
  assert labels.language_truth[0] == "ja"  # the text it fires in is Japanese
  assert labels.language[1] == labels.language_truth[1] == "ja"  # where script = language


def _entry(step, bilingual, concept, alignment, n=400):
  k = lambda share: [share, max(share - 0.05, 0), min(share + 0.05, 1)]
  return {"checkpoint": f"step{step}", "step": step, "control": step == 0,
          "n_language_labelled": n, "n_language_truth": n, "n_granularity_labelled": n,
          "language_shares": {"en": k((1 - bilingual) / 2), "ja": k((1 - bilingual) / 2),
                              "bilingual": k(bilingual)},
          "language_shares_truth": {"bilingual": k(bilingual)},
          "granularity_shares": {"token": k(1 - concept), "concept_synonym": k(concept),
                                 "concept_semantic": k(0.0), "uninterpretable": k(0.0)},
          "model_alignment": alignment, "synonym_similarity": 0.1}


def test_verdicts_follow_their_numbers():
  # The paper's story: bilingual and concept-level shares rise with the model's alignment.
  story = [_entry(0, 0.4, 0.3, 0.02)] + [_entry(s, b, c, a) for s, b, c, a in (
      (10, 0.05, 0.05, 0.05), (30, 0.10, 0.10, 0.2), (100, 0.2, 0.2, 0.4), (300, 0.3, 0.3, 0.6))]
  v = verdicts(story)
  assert v["language_specific_first"]["answer"] is True
  assert v["language_specific_first"]["first"] == "step10"  # step 0 is the control, left out
  assert v["token_level_first"]["answer"] is True
  assert v["sae_follows_model"]["answer"] is True
  assert v["sae_follows_model"]["rank_correlation"] == pytest.approx(1)
  assert abs(v["sae_follows_model"]["p_one_sided"] - 1 / 24) < 1e-12  # 4 points: 1 of 4!
  # The opposite: shares fall while the model aligns.
  falling = [_entry(s, b, c, a) for s, b, c, a in (
      (10, 0.3, 0.3, 0.05), (30, 0.2, 0.2, 0.2), (100, 0.1, 0.1, 0.4), (300, 0.05, 0.05, 0.6))]
  v = verdicts(falling)
  assert [v[k]["answer"] for k in v] == [False, False, False]
  # A model that never aligns (every interval covers 0) leaves nothing to follow: undecided.
  flat = [{**e, "model_alignment_ci": [-0.01, 0.01]} for e in falling]
  v = verdicts(flat)
  assert v["sae_follows_model"]["answer"] is None and v["sae_follows_model"]["model_never_aligns"]
  # Few features: a rise that the intervals cannot tell from none is undecided.
  few = [_entry(10, 0.1, 0.1, 0.1, n=20), _entry(300, 0.2, 0.2, 0.2, n=20)]
  v = verdicts(few)
  assert v["language_specific_first"]["answer"] is None
  assert v["sae_follows_model"]["answer"] is None  # two checkpoints rank nothing


def test_newcombe_and_spearman():
  d = newcombe_difference([0.5, 0.45, 0.55], [0.5, 0.45, 0.55], 100, 100)
  assert d[0] == 0 and d[1] < 0 < d[2]
  rho, p = spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
  assert rho == pytest.approx(-1) and p == 1.0
  rho, p = spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5])
  assert 0.8 < rho < 1 and 1 / 120 < p < 0.1
