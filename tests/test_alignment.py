"""The model-level ground truth (analysis/alignment.py): planted alignment reads high, a random
model reads at the null."""

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.analysis.alignment import (WordVectors, cross_language_probe, model_alignment,
                                        similarity_gap, word_vectors)
from flax import nnx

from sae_jax.models.base import param_name, with_params
from sae_jax.models.hf import abstract_model
from sae_jax.toy.lm import TINY_LM, TINY_WORLD, model_config
from sae_jax.toy.world import World


def _model(world, planted: bool):
  """A 1-layer toy model; planted: its blocks write nothing (resid_post.0 is the embedding)
  and the embedding of every form of a concept, in either language, is the concept's vector
  plus a language offset and noise."""
  lm = TINY_LM.__class__(**{**TINY_LM.__dict__, "n_layers": 1})
  mc = model_config(world, lm)
  rng = np.random.default_rng(0 if planted else 1)
  # The toy LM's initialisation, drawn in numpy (no JAX compile per parameter shape).
  graphdef, template = abstract_model(mc)
  shapes = {param_name(p): v.shape for p, v in nnx.to_flat_state(template)}
  params = {k: np.ones(shape, np.float32) if k.endswith("norm.weight") else
            (0.02 * rng.normal(size=shape)).astype(np.float32) for k, shape in shapes.items()}
  if planted:
    emb = rng.normal(size=params["model.embed_tokens.weight"].shape).astype(np.float32)
    offset = {"en": rng.normal(size=mc.d_model), "ja": rng.normal(size=mc.d_model)}
    for c in world.concepts:
      v = rng.normal(size=mc.d_model)
      for lang in ("en", "ja"):
        for form in getattr(c, lang):
          emb[world.word_index[form]] = v + offset[lang] + 0.3 * rng.normal(size=mc.d_model)
    params["model.embed_tokens.weight"] = emb
    for k in params:
      if k.endswith(("o_proj.weight", "down_proj.weight")):
        params[k] = np.zeros_like(params[k])
  return nnx.merge(graphdef, with_params(template, {k: jnp.asarray(v)
                                                   for k, v in params.items()}))


@pytest.fixture(scope="module")
def world():
  return World(TINY_WORLD)


def test_planted_alignment_reads_high_and_a_random_model_at_the_null(world):
  read = lambda planted: model_alignment(word_vectors(_model(world, planted), world,
                                                      "resid_post.0", n_docs=300, batch=256))
  planted, rand = read(True), read(False)
  assert planted["concepts"] > 30 and planted["probe_n"] > 1000
  chance = 1 / planted["concepts"]
  assert planted["probe_ci"][0] > 0.9 and planted["probe_p"] < 0.01
  assert abs(planted["probe_null"] - chance) < 0.5 * chance  # the null's mean is chance
  assert planted["translation_similarity"]["lo"] > 0.5
  assert planted["synonym_similarity"]["lo"] > 0.5
  # A random model: its embeddings of translations are unrelated, so the probe reads inside
  # the null's 95 % range, and no similarity gap is there.
  lo, hi = rand["probe_null_range"]
  assert lo <= rand["probe_accuracy"] <= hi and rand["probe_p"] > 0.025, rand
  for kind in ("translation_similarity", "synonym_similarity"):
    assert rand[kind]["lo"] <= 0 <= rand[kind]["hi"], (kind, rand[kind])


def _vectors(seed, aligned, n_c=20, d=16, per=30):
  """Concept c is the same direction in both languages (aligned), or an independent one."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n_c, d))
  ja_dirs = base if aligned else rng.normal(size=(n_c, d))
  concept = np.tile(np.arange(n_c), 2 * per)
  lang = np.repeat(np.asarray(["en", "ja"], dtype=object), n_c * per)
  x = np.where((lang == "en")[:, None], base[concept], ja_dirs[concept]) + \
      0.5 * rng.normal(size=(len(concept), d))
  return WordVectors(x, concept, np.zeros(len(concept), np.int64),
                     np.asarray(["a"] * len(concept), dtype=object), lang)


def test_probe_on_vectors_alone():
  aligned = cross_language_probe(_vectors(3, True))
  assert aligned.lo > 0.9 and aligned.p < 0.01 and aligned.null_hi < 0.3
  gap = similarity_gap(_vectors(3, True), "translation")
  assert gap["lo"] > 0.5 and gap["pairs"] == 20  # one per concept
  # Unaligned: the null is calibrated, so p < 0.05 about 1 time in 20 (at most 4 of 20 draws
  # here: a chance of 0.3 % under a calibrated null), and the mean reads chance.
  apart = [cross_language_probe(_vectors(s, False), n_null=200) for s in range(20)]
  assert sum(r.p < 0.05 for r in apart) <= 4
  assert abs(np.mean([r.accuracy for r in apart]) - 1 / 20) < 0.02
