"""The toy world: determinism, ground truth alignment, real checkpoints that learn."""

import json

import numpy as np
import pytest
import torch

import sae_jax as sj
from sae_jax.toy.lm import TINY_LM, TINY_WORLD, checkpoint_steps, train_toy_lm
from sae_jax.toy.world import DIGITS, World, WorldConfig


def test_same_seed_same_world_different_seed_different():
  a, b = World(TINY_WORLD), World(TINY_WORLD)
  assert a.vocab == b.vocab
  assert [d.tokens for d in a.documents(50, 1)] == [d.tokens for d in b.documents(50, 1)]
  c = World(WorldConfig(seed=1, n_nouns=42, n_adjectives=6))
  assert c.vocab != a.vocab


def test_default_world_inventory():
  w = World()
  nouns = [c for c in w.concepts if c.pos == "noun"]
  assert len(w.concepts) >= 200 and len({c.category for c in nouns}) == 7
  assert any(len(c.en) > 1 for c in w.concepts) and any(len(c.ja) > 1 for c in w.concepts)
  for c in w.concepts:  # English in Latin script; Japanese in kana, or shared (Latin)
    assert all(f.isascii() for f in c.en)
    assert all(all("\u3040" <= ch <= "\u30ff" for ch in f) or f in w.shared_forms
               for f in c.ja)
  # Shared forms: names (one form, alike in both languages) and loanwords (a Japanese synonym
  # that is the English form), so a token's script does not always tell its language.
  names = [c for c in w.concepts if c.name.startswith("name_")]
  assert len(names) == w.cfg.n_names and all(c.en == c.ja and c.en[0][0].isupper() for c in names)
  loans = [c for c in w.concepts if c.en[0] in c.ja and c not in names]
  assert 0.05 < len(loans) / len(w.concepts) < 0.3


def test_labels_line_up_with_tokens_and_probabilities_are_exact():
  w = World(TINY_WORLD)
  docs = w.documents(300, 5)
  for d in docs:
    n = len(d.tokens)
    assert all(len(x) == n for x in (d.language, d.concept, d.category, d.form, d.pos, d.logprob))
    for tok, lang, cid, form in zip(d.tokens[1:], d.language[1:], d.concept[1:], d.form[1:]):
      if cid >= 0:
        c = w.concepts[cid]
        assert getattr(c, lang)[form] == tok
      else:
        assert tok in (".", "the", "は", "を") + DIGITS
      # A token's truth is its sentence's language, whatever its script.
      assert lang in ("en", "ja", "shared")
    if d.doc_type == "parallel":  # each Japanese sentence translates the English before it
      sents, cur = [], []
      for tok, cid in zip(d.tokens[1:], d.concept[1:]):
        cur.append(cid)
        if tok == ".":
          sents.append(sorted(x for x in cur if x >= 0))
          cur = []
      assert all(sents[i] == sents[i + 1] for i in range(0, len(sents), 2))
  # An English sentence opens "the": the next token is an adjective (probability p_adjective,
  # uniform over adjectives) or a subject noun (uniform over subjects), uniform over the
  # concept's forms; the recorded log-probabilities are exactly these.
  # A digit comes first with probability p_number (uniform over the digits); without one the
  # next word's probability carries the 1 - p_number.
  pa, pn, checked, digits = w.cfg.p_adjective, w.cfg.p_number, 0, 0
  for d in docs:
    for t in range(1, len(d.tokens) - 1):
      if d.tokens[t] == "the" and d.tokens[t - 1] in ("<bos>", "."):
        if d.tokens[t + 1] in DIGITS:
          assert d.logprob[t + 1] == pytest.approx(np.log(pn / len(DIGITS)), abs=1e-12)
          assert d.language[t + 1] == "en"
          digits += 1
          continue
        c = w.concepts[d.concept[t + 1]]
        p = (1 - pn) * (pa / len(w.adjectives) if c.pos == "adj" else (1 - pa) / len(w.subjects))
        assert c in (w.adjectives if c.pos == "adj" else w.subjects)
        assert d.logprob[t + 1] == pytest.approx(np.log(p / len(c.en)), abs=1e-12)
        checked += 1
  assert checked > 300 and digits > 10
  # Latin-script words inside Japanese sentences are Japanese by the truth.
  latin_in_ja = [(tok, lang) for d in docs if d.doc_type == "ja"
                 for tok, lang in zip(d.tokens[1:], d.language[1:]) if tok.isascii() and tok != "."]
  assert latin_in_ja and all(lang == "ja" for _, lang in latin_in_ja)
  # The entropy is the mean negative log-probability of every token after <bos>.
  lps = [lp for d in docs for lp in d.logprob[1:]]
  assert w.entropy(docs) == pytest.approx(-sum(lps) / len(lps), rel=1e-12)


def test_tokenizer_round_trip():
  w = World(TINY_WORLD)
  tok = w.tokenizer()
  d = w.documents(1, 3)[0]
  assert tok(d.text)["input_ids"] == [w.word_index[t] for t in d.tokens]


def test_checkpoint_steps_are_log_spaced_from_zero():
  # No step 1: the first update runs at learning rate 0 (warm-up), so step 1 is step 0.
  assert checkpoint_steps(1500) == [0, 3, 10, 30, 100, 300, 1000, 1500]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy")
  return out, train_toy_lm(out, TINY_WORLD, TINY_LM)


@pytest.mark.slow
def test_toy_lm_learns_towards_the_world_entropy(toy):
  out, summary = toy
  losses = [summary["checkpoints"][r]["eval_loss"] for r in summary["revisions"]]
  assert all(b <= a + 1e-3 for a, b in zip(losses, losses[1:])), losses
  # Stated margin for the tiny configuration (400 steps): within 0.2 nats of the bound.
  assert losses[-1] - summary["entropy_nats_per_token"] < 0.2
  assert losses[-1] > summary["entropy_nats_per_token"] - 0.02  # nothing beats the generator


@pytest.mark.slow
def test_checkpoints_load_in_transformers_and_ours_alike(toy):
  from transformers import AutoModelForCausalLM
  out, summary = toy
  docs = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()[:5]]
  for rev in (summary["revisions"][0], summary["revisions"][-1]):
    ours = sj.load_model(out, revision=rev)
    enc = ours.tokenizer([d["text"] for d in docs], return_tensors="np", padding=True)
    assert list(enc["input_ids"][0][:len(docs[0]["tokens"])]) == [
        ours.tokenizer.convert_tokens_to_ids(t) for t in docs[0]["tokens"]]
    hf = AutoModelForCausalLM.from_pretrained(out / rev).eval()
    with torch.no_grad():
      ref = hf(torch.tensor(enc["input_ids"]),
               attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    mine = np.asarray(ours.logits(enc["input_ids"], enc["attention_mask"]))
    real = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(mine[real], ref[real], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_same_seed_same_checkpoints(toy, tmp_path):
  from safetensors.numpy import load_file
  out, summary = toy
  small = TINY_LM.__class__(**{**TINY_LM.__dict__, "steps": 10, "train_docs": 2000})
  a = train_toy_lm(tmp_path / "a", TINY_WORLD, small)
  b = train_toy_lm(tmp_path / "b", TINY_WORLD, small)
  assert a == b
  for rev in a["revisions"]:
    ta = load_file(str(tmp_path / "a" / rev / "model.safetensors"))
    tb = load_file(str(tmp_path / "b" / rev / "model.safetensors"))
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
  assert (tmp_path / "a" / "eval.jsonl").read_text() == (tmp_path / "b" / "eval.jsonl").read_text()
