"""Granularity in the paper's four classes, automatic, from a feature's examples.

The authors labelled features 0-99 of each checkpoint by hand: token-level, concept-level
(synonymy), concept-level (semantic similarity), uninterpretable. This rule approximates them
from what the hand labeller saw, each example's strongest token (the first position with the
highest quantised value, as the paper's language rule reads it):

* forms: the strongest tokens' normalised surface forms (subword and byte-piece markers and
  surrounding space dropped, Unicode NFKC for width, case folded);
* ``token``: one form has >= ``token_share`` of the examples, or the two commonest forms have
  >= ``pair_share`` (the labeller called a feature on two unrelated names token-level);
* a lexicon (the toy world's own, a TSV file): forms of one concept covering >= ``concept_share``
  of the covered examples -> ``concept_synonym``, of one category -> ``concept_semantic``;
* without a lexicon entry, by form: few distinct forms (distinct / examples <=
  ``concept_distinct``) -> concept-level: ``concept_synonym`` when the commonest forms are one
  family of spellings (a shared stem of >= ``stem_chars`` characters), else
  ``concept_semantic``;
* otherwise ``uninterpretable`` (the examples share neither form nor concept).

Thresholds: :class:`GranularityConfig`, chosen on the authors' released features
(tests/data/llm_jp_sae_demo; the score is printed by tests/test_labels_paper.py).
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata
from typing import Sequence

from sae_jax.analysis.lexicon import Lexicon, clean_token
from sae_jax.analysis.examples import Example

GRANULARITIES = ("token", "concept_synonym", "concept_semantic", "uninterpretable")


@dataclasses.dataclass(frozen=True)
class GranularityConfig:
  """Thresholds of the four-class rule (see the module docstring)."""

  token_share: float = 0.9
  pair_share: float = 0.9
  concept_share: float = 0.8
  min_coverage: float = 0.5
  concept_distinct: float = 0.6
  stem_chars: int = 3
  family_share: float = 0.8


@dataclasses.dataclass(frozen=True)
class GranularityResult:
  """A feature's class and what decided it."""

  granularity: str
  top_form: str  # the commonest strongest form ("" without examples)
  top_share: float  # its share of the examples
  pair_share: float  # share of the two commonest forms
  distinct_share: float  # distinct forms / examples
  basis: str  # "form", "lexicon" or "none"


def normalise_form(token: str) -> str:
  """A token's surface form for comparison: markers and space dropped, NFKC, case folded."""
  return unicodedata.normalize("NFKC", clean_token(token)).strip().casefold()


def strongest_forms(examples: Sequence[Example]) -> list[str]:
  """The normalised form of each example's strongest token."""
  return [normalise_form(ex.tokens[ex.strongest]) for ex in examples if ex.tokens]


def _stem_family(forms: list[tuple[str, int]], stem_chars: int) -> bool:
  """Whether the forms (with counts) share a stem: a common prefix of >= ``stem_chars``
  characters with the commonest form, or one form inside another."""
  head = forms[0][0]
  for form, _ in forms[1:]:
    common = len(_common_prefix(head, form))
    if common < stem_chars and not (len(form) >= stem_chars and form in head) and not (
        len(head) >= stem_chars and head in form):
      return False
  return len(forms) > 1


def _common_prefix(a: str, b: str) -> str:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return a[:n]


def _by_lexicon(counts: collections.Counter, total: int, lexicon: Lexicon,
                cfg: GranularityConfig) -> str | None:
  """``concept_synonym`` / ``concept_semantic`` from the lexicon, or None if it does not say."""
  concept: collections.Counter = collections.Counter()
  category: collections.Counter = collections.Counter()
  covered = 0
  for form, n in counts.items():
    entry = lexicon.entries.get(form) or lexicon.lookup(form)
    if entry is None:
      continue
    covered += n
    concept[entry.concept] += n
    category[entry.category] += n
  if covered == 0 or covered < cfg.min_coverage * total:
    return None
  if concept.most_common(1)[0][1] >= cfg.concept_share * covered:
    return "concept_synonym"
  if category.most_common(1)[0][1] >= cfg.concept_share * covered and len(concept) > 1:
    return "concept_semantic"
  return None


def _family_forms(ranked: list[tuple[str, int]], total: int, share: float
                  ) -> list[tuple[str, int]]:
  """The commonest forms that together reach ``share`` of the examples."""
  out, have = [], 0
  for form, n in ranked:
    out.append((form, n))
    have += n
    if have >= share * total:
      break
  return out


def classify(examples: Sequence[Example], lexicon: Lexicon | None = None,
             cfg: GranularityConfig = GranularityConfig()) -> GranularityResult:
  """One feature's granularity from its examples."""
  forms = strongest_forms(examples)
  total = len(forms)
  if total == 0:
    return GranularityResult("uninterpretable", "", 0.0, 0.0, 0.0, "none")
  counts = collections.Counter(forms)
  ranked = counts.most_common()
  top = ranked[0][1] / total
  pair = sum(n for _, n in ranked[:2]) / total
  distinct = len(ranked) / total

  def result(label: str, basis: str) -> GranularityResult:
    return GranularityResult(label, ranked[0][0], top, pair, distinct, basis)

  if top >= cfg.token_share:
    return result("token", "form")
  if lexicon is not None:
    found = _by_lexicon(counts, total, lexicon, cfg)
    if found is not None:
      return result(found, "lexicon")
  if pair >= cfg.pair_share:
    return result("token", "form")
  if distinct <= cfg.concept_distinct:
    family = _family_forms(ranked, total, cfg.family_share)
    synonym = _stem_family(family, cfg.stem_chars)
    return result("concept_synonym" if synonym else "concept_semantic", "form")
  return result("uninterpretable", "form")
