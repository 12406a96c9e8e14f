"""The paper's labels as pure functions of a feature's examples (tokens and activations).

Inaba et al. (2025), as their v1 code does it (llm-jp/llm-jp-sae, commit d9eb8c6:
``collect_feature_pattern.py``, ``evaluate.py``):

* Examples: per feature, up to 50 sequences in which it fires above 0.7 x its maximum; each
  token's activation clipped at 0 and quantised to ``ceil(10 * a / max)``, ``max`` the largest
  activation over the feature's examples (examples.py: ``quantise``).
* Language of an example (:func:`paper_token_language`): the first position with the highest
  quantised value; its token, stripped (``str.strip``), is English if it matches
  ``^[a-zA-Z\\s"'(),.\\-]+$``, defers to the previous token if it is all ASCII digits (from
  position 0 Python's index -1: the last token), and is Japanese otherwise (punctuation, byte
  tokens, accented Latin, an empty token). Label (:func:`language_label`): English count
  > 0.9 x examples -> ``en``, Japanese likewise -> ``ja``, otherwise ``bilingual``.
* The project's earlier script rule is kept as the variant ``script``
  (:func:`script_token_language`): Latin -> en, kana / kanji -> ja, digits defer, anything else
  undecided; the share is taken over the decided examples.

The same functions label our features (built from the evaluation set, see labels.py) and
anyone's (examples.py reads the authors' released demo format). Granularity in the paper's four
classes, automatic: granularity.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from sae_jax.analysis.examples import Example
from sae_jax.analysis.lexicon import script_of
from sae_jax.errors import DataError

PAPER_LANGUAGES = ("en", "ja", "bilingual", "none")  # "none": a feature without examples
LANGUAGE_RULES = ("paper", "script")

_EN = re.compile(r"^[a-zA-Z\s\"\'\(\),\.\-]+$")
_DIGITS = re.compile(r"^[0-9]+$")


def paper_token_language(tokens: Sequence[str], idx: int) -> str:
  """``en`` or ``ja`` of the token at ``idx`` by the paper's rule (digits defer backwards).

  Python indexing as in the paper: before position 0 comes the last token. A sequence of digits
  only (where the paper's recursion fails) is ``ja``, the rule's catch-all.
  """
  for _ in range(len(tokens)):
    token = tokens[idx].strip()
    if _EN.match(token):
      return "en"
    if not _DIGITS.match(token):
      return "ja"
    idx -= 1
  return "ja"


def script_token_language(tokens: Sequence[str], idx: int, max_lookback: int = 8) -> str:
  """``en``, ``ja`` or ``none`` by the token's script (the project's earlier rule, a variant):
  Latin -> en, kana / kanji -> ja, digits defer to the previous token (not before position 0),
  anything else undecided."""
  for _ in range(max_lookback + 1):
    s = script_of(tokens[idx])
    if s != "digit":
      return s
    if idx == 0:
      return "none"
    idx -= 1
  return "none"


def language_counts(examples: Iterable[Example], rule: str = "paper") -> tuple[int, int]:
  """(English, Japanese) examples by ``rule`` ("paper" or "script")."""
  if rule not in LANGUAGE_RULES:
    raise DataError(f"unknown language rule {rule!r}; expected one of {LANGUAGE_RULES}")
  fn = paper_token_language if rule == "paper" else script_token_language
  n_en = n_ja = 0
  for ex in examples:
    if not ex.tokens:
      continue
    lang = fn(ex.tokens, ex.strongest)
    n_en += lang == "en"
    n_ja += lang == "ja"
  return n_en, n_ja


def language_label(n_en: int, n_ja: int, total: int, share: float = 0.9) -> str:
  """``en`` if ``n_en > share * total``, ``ja`` likewise, else ``bilingual`` (``none`` if
  ``total`` is 0). The paper's total is the number of examples; the script variant's, the
  decided ones."""
  if total <= 0:
    return "none"
  if n_en > share * total:
    return "en"
  if n_ja > share * total:
    return "ja"
  return "bilingual"


@dataclasses.dataclass(frozen=True)
class LanguageResult:
  """A feature's language by both rules: counts and labels."""

  n_en: int
  n_ja: int
  language: str  # the paper's rule
  n_en_script: int
  n_ja_script: int
  language_script: str  # the variant


def feature_language(examples: Sequence[Example], share: float = 0.9) -> LanguageResult:
  """Both rules on one feature's examples."""
  n_en, n_ja = language_counts(examples, "paper")
  s_en, s_ja = language_counts(examples, "script")
  return LanguageResult(n_en, n_ja, language_label(n_en, n_ja, len(examples), share),
                        s_en, s_ja, language_label(s_en, s_ja, s_en + s_ja, share))


