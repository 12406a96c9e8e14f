"""Language and granularity labels for every feature, with the rules' thresholds as config.

The paper's own rules (Inaba et al. 2025; their v1 code) are pure functions of a feature's
examples (paper.py, granularity.py): ``language`` (the primary label, with its counts ``n_en``,
``n_ja``) and ``granularity_paper`` (the paper's four classes), from examples collected as the
authors' code collects them (paper_examples.py; :func:`sae_examples` reads them);
:func:`label_examples` labels anyone's.

Language by script (``language_script``: the project's earlier rule, a variant of the paper's
- it leaves punctuation undecided where the paper counts it Japanese; ``language`` itself where
the paper's examples were not given): take the feature's example set (up to
``n_examples`` sequences drawn at random among those where it fires at >= ``example_fraction``
of its maximum), look at each example's maximally activating token, decide its script (Latin ->
en, kana/kanji -> ja; a digit defers to the previous token, punctuation is undecided); more
than ``language_share`` of the decided examples in one language -> that language, else
``bilingual``; nothing decided -> ``none``; a feature that never fired -> ``dead``.
The same rule run on the token metadata (the document's language, or the toy world's
per-token truth) gives ``language_meta``; run on the whole population the examples sample
(every firing at >= ``example_fraction`` of the max) with per-token ground truth instead of
scripts, it gives ``language_truth``.

Granularity, over the same example tokens:
  ``token``                 one surface form has >= ``token_share`` of the examples;
  ``concept_synonym``       one concept (lexicon) has >= ``concept_share`` of the covered
                            examples, with several surface forms of one language;
  ``concept_translation``   the same, with surface forms of several languages;
  ``semantic``              one category has >= ``category_share``, several concepts;
  ``other``                 none of these (or under ``min_coverage`` of examples in the lexicon).
Without a lexicon only ``token`` vs ``multi_token`` is claimed. ``granularity_truth`` applies
the rules to that whole population of strong firings instead of the 50 examples.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np

from sae_jax.analysis.examples import Example, FeatureExamples
from sae_jax.analysis.granularity import GranularityConfig, classify
from sae_jax.analysis.lexicon import Lexicon, script_of
from sae_jax.analysis.paper import feature_language
from sae_jax.analysis.stats import FeatureStats
from sae_jax.languages import EN, JA

LANGUAGE_LABELS = ("en", "ja", "bilingual", "none", "dead")
LANGUAGE_SPECIFIC = ("en", "ja")  # the labels of a feature of one language
GRANULARITY_LABELS = ("token", "concept_synonym", "concept_translation", "semantic", "other",
                      "multi_token", "dead")
LEXICON_GRANULARITIES = GRANULARITY_LABELS[:5]  # what a live feature gets with a lexicon


@dataclasses.dataclass(frozen=True)
class FeatureLabels:
  """The labels of one SAE's features: [M] object arrays of label names (``en_share``: float,
  NaN where no example was decided)."""

  language: np.ndarray  # the paper's rule (the script rule without the paper's examples)
  language_meta: np.ndarray  # the same rule on the token metadata
  language_truth: np.ndarray  # the rule on all strong firings with per-token truth
  en_share: np.ndarray
  granularity: np.ndarray  # over the examples
  granularity_truth: np.ndarray  # over all strong firings
  # With the paper's examples: the script rule as the variant beside ``language``, the paper
  # rule's counts and the paper's four granularity classes (None without them).
  language_script: np.ndarray | None = None
  n_en: np.ndarray | None = None  # [M] int (-1 for dead features)
  n_ja: np.ndarray | None = None
  granularity_paper: np.ndarray | None = None  # token, concept_*, uninterpretable, none, dead

  @property
  def by_paper_rule(self) -> bool:
    """Whether ``language`` is the paper's rule (the paper's examples were given)."""
    return self.language_script is not None


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """Thresholds of the label rules (see the module docstring)."""

  example_fraction: float = 0.7
  language_share: float = 0.9
  token_share: float = 0.9
  concept_share: float = 0.9
  category_share: float = 0.9
  min_coverage: float = 0.5
  max_digit_lookback: int = 8


def _lang_from_shares(n_en: np.ndarray, n_ja: np.ndarray, share: float) -> np.ndarray:
  total = n_en + n_ja
  out = np.full(n_en.shape, "bilingual", dtype=object)
  out[n_en > share * total] = "en"
  out[n_ja > share * total] = "ja"
  out[total == 0] = "none"
  return out


def language_labels(stats: FeatureStats, ids: np.ndarray, token_text: list[str],
                    token_lang: np.ndarray, cfg: LabelConfig = LabelConfig()) -> dict:
  """{'language', 'language_meta', 'language_truth', 'en_share'}: [M] arrays."""
  scripts = np.asarray([script_of(t) for t in token_text], dtype=object)
  mask, seq, pos = stats.examples(cfg.example_fraction)
  # Paper rule: the script of each example's max token; digits defer to the previous token.
  script = scripts[ids[seq, pos]]
  p = pos.copy()
  for _ in range(cfg.max_digit_lookback):
    digit = (script == "digit") & (p > 0)
    if not digit.any():
      break
    p = np.where(digit, p - 1, p)
    script = np.where(digit, scripts[ids[seq, p]], script)
  n_en = ((script == "en") & mask).sum(1)
  n_ja = ((script == "ja") & mask).sum(1)
  paper = _lang_from_shares(n_en, n_ja, cfg.language_share)
  # The same rule on the token metadata (document language, or per-token truth).
  meta = token_lang[seq, pos]
  meta_label = _lang_from_shares(((meta == EN) & mask).sum(1), ((meta == JA) & mask).sum(1),
                                 cfg.language_share)
  # Ground truth (where tokens carry their language, as in the toy world): the same rule on the
  # whole population the examples sample - every firing at >= example_fraction of the max -
  # with each token's true language instead of its script.
  if stats.strong_lang is not None:
    truth = _lang_from_shares(stats.strong_lang[EN], stats.strong_lang[JA], cfg.language_share)
  else:
    truth = _lang_from_shares(stats.lang_sum[EN], stats.lang_sum[JA], cfg.language_share)
  dead = ~stats.live
  for a in (paper, meta_label, truth):
    a[dead] = "dead"
  en_share = np.where(n_en + n_ja > 0, n_en / np.maximum(n_en + n_ja, 1), np.nan)
  return {"language": paper, "language_meta": meta_label, "language_truth": truth,
          "en_share": en_share}


def _classify(forms: np.ndarray, weights: np.ndarray, entries: list, cfg: LabelConfig,
              have_lexicon: bool) -> str:
  """One feature's granularity from its (token id, weight) list; entries[t]: lexicon entry."""
  total = weights.sum()
  if total <= 0:
    return "dead"
  by_form: dict[int, float] = {}
  for t, w in zip(forms, weights):
    by_form[int(t)] = by_form.get(int(t), 0.0) + float(w)
  if max(by_form.values()) >= cfg.token_share * total:
    return "token"
  if not have_lexicon:
    return "multi_token"
  covered = [(t, w, entries[t]) for t, w in by_form.items() if entries[t] is not None]
  cov = sum(w for _, w, _ in covered)
  if cov < cfg.min_coverage * total:
    return "other"
  by_concept: dict[str, float] = {}
  by_category: dict[str, float] = {}
  for _, w, e in covered:
    by_concept[e.concept] = by_concept.get(e.concept, 0.0) + w
    by_category[e.category] = by_category.get(e.category, 0.0) + w
  top_concept = max(by_concept, key=by_concept.get)
  if by_concept[top_concept] >= cfg.concept_share * cov:
    langs = {e.language for _, _, e in covered if e.concept == top_concept}
    return "concept_translation" if len(langs - {None}) > 1 else "concept_synonym"
  top_cat = max(by_category, key=by_category.get)
  if by_category[top_cat] >= cfg.category_share * cov and len(by_concept) > 1:
    return "semantic"
  return "other"


def granularity_labels(stats: FeatureStats, ids: np.ndarray, token_text: list[str],
                       lexicon: Lexicon | None, cfg: LabelConfig = LabelConfig()) -> dict:
  """{'granularity', 'granularity_truth'}: [M] label arrays (truth: over all firings)."""
  entries = ([lexicon.lookup(t) for t in token_text] if lexicon is not None
             else [None] * len(token_text))
  mask, seq, pos = stats.examples(cfg.example_fraction)
  ex_tok = ids[seq, pos]
  g = np.empty(stats.d_sae, dtype=object)
  gt = np.empty(stats.d_sae, dtype=object)
  have = lexicon is not None
  for f in range(stats.d_sae):
    if not stats.live[f]:
      g[f] = gt[f] = "dead"
      continue
    m = mask[f]
    g[f] = _classify(ex_tok[f][m], np.ones(int(m.sum())), entries, cfg, have)
    if stats.strong_keys is not None:
      toks, weight = stats.strong_tokens(f)
    else:
      toks, weight = stats.token_counts(f, mass=True)
    gt[f] = _classify(toks, weight.astype(float), entries, cfg, have)
  return {"granularity": g, "granularity_truth": gt}


def label_features(stats: FeatureStats, ids: np.ndarray, token_text: list[str],
                   token_lang: np.ndarray, lexicon: Lexicon | None,
                   cfg: LabelConfig = LabelConfig(), mask: np.ndarray | None = None
                   ) -> FeatureLabels:
  """Language and granularity labels of every feature (arrays [M]); ``ids``/``token_lang``:
  [S, T] of the evaluation set the stats were made from. With ``mask`` (its counted tokens
  [S, T]) and the paper's examples in ``stats`` (codes.py collects them) also the paper's rules
  on those examples."""
  lang = language_labels(stats, ids, token_text, token_lang, cfg)
  paper = {}
  if mask is not None and stats.paper_seq is not None:
    feats = sae_examples(stats, ids, mask, token_text)
    paper = paper_label_arrays(stats.d_sae, label_examples(feats, lexicon, language_share=
                                                           cfg.language_share))
    paper["language_script"] = lang["language"]
    lang["language"] = paper.pop("language")
    decided = paper["n_en"] + paper["n_ja"]
    lang["en_share"] = np.where(decided > 0, paper["n_en"] / np.maximum(decided, 1), np.nan)
  return FeatureLabels(**lang, **granularity_labels(stats, ids, token_text, lexicon, cfg),
                       **paper)


def sae_examples(stats: FeatureStats, ids: np.ndarray, mask: np.ndarray, token_text: list[str]
                 ) -> Iterator[FeatureExamples]:
  """Every live feature's examples as the paper collects and records them (paper_examples.py:
  the first ``n_examples`` sequences of the evaluation set where the feature's top-k code is
  above 0.7 x its maximum pre-activation): each example sequence's counted tokens
  (SentencePiece's marker written as a space) with the feature's pre-activation on each,
  quantised by the max over the feature's examples. A live feature none of whose codes passes
  the threshold has no examples (the authors' code saves no file for it). One feature at a
  time: at the paper's scale the examples of all 32,768 features are millions of tuples."""
  texts: dict[int, tuple[str, ...]] = {}
  for f in np.nonzero(stats.live)[0]:
    examples = []
    for e, s in enumerate(stats.paper_seq[f]):
      if s < 0:
        break
      s = int(s)
      if s not in texts:
        texts[s] = tuple(_spaced(token_text[t]) for t in ids[s][mask[s]])
      examples.append(Example(texts[s], tuple(stats.paper_acts[f, e][mask[s]].tolist())))
    yield FeatureExamples(int(f), tuple(examples))


def _spaced(token: str) -> str:
  """A token piece with its tokenizer's space marker written as a space (as the paper does)."""
  return token.replace("\u2581", " ").replace("\u0120", " ")


def paper_label_arrays(d_sae: int, labels: list[ExampleLabels]) -> dict:
  """{'language', 'n_en', 'n_ja', 'granularity_paper'}: [M] arrays ("dead" / -1 for the
  features ``labels`` does not name; granularity "none" for a feature without examples, which
  the paper does not label)."""
  lang = np.full(d_sae, "dead", dtype=object)
  gran = np.full(d_sae, "dead", dtype=object)
  n_en = np.full(d_sae, -1, np.int64)
  n_ja = np.full(d_sae, -1, np.int64)
  for x in labels:
    lang[x.feature] = x.language
    gran[x.feature] = x.granularity if x.n_examples else "none"
    n_en[x.feature], n_ja[x.feature] = x.n_en, x.n_ja
  return {"language": lang, "n_en": n_en, "n_ja": n_ja, "granularity_paper": gran}


@dataclasses.dataclass(frozen=True)
class ExampleLabels:
  """The labels of one feature given by its examples: the paper's language rule (counts and
  label), the script variant, and the four-class granularity with what decided it."""

  feature: int
  n_examples: int
  n_en: int
  n_ja: int
  language: str  # the paper's rule
  language_script: str  # the project's earlier script rule
  granularity: str  # token, concept_synonym, concept_semantic, uninterpretable
  top_form: str
  top_share: float
  pair_share: float
  distinct_share: float
  granularity_basis: str


def label_examples(features: Iterable[FeatureExamples], lexicon: Lexicon | None = None,
                   cfg: GranularityConfig = GranularityConfig(), language_share: float = 0.9
                   ) -> list[ExampleLabels]:
  """Language (both rules) and granularity of each feature from its examples alone."""
  out = []
  for f in features:
    lang = feature_language(f.examples, language_share)
    g = classify(f.examples, lexicon, cfg)
    out.append(ExampleLabels(f.feature, len(f.examples), lang.n_en, lang.n_ja, lang.language,
                             lang.language_script, g.granularity, g.top_form, g.top_share,
                             g.pair_share, g.distinct_share, g.basis))
  return out
