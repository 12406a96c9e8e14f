"""Scripts and lexicons: what a token is, as far as the labels need to know.

* ``script_of``: the writing system of a token's text (the paper's language rule): Latin ->
  ``en``, kana / kanji -> ``ja``, digits -> ``digit`` (deferred to the previous token by the
  rule), anything else (punctuation, specials, empty) -> ``none``.
* A :class:`Lexicon` maps a surface form to its concept id, category and (optionally)
  language: synonyms share a concept, translations share a concept across languages, concepts
  of one category share a category. The toy world supplies its own (``toy_lexicon``); a user
  supplies a TSV file (``load_lexicon``): ``form<TAB>concept<TAB>category[<TAB>language]``,
  ``#`` comments and blank lines ignored.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path

from sae_jax import paths, store
from sae_jax.errors import ConfigError, DataError
from sae_jax.toy.world import World, WorldConfig

TOY_SOURCE = "toy world"  # how a toy world's lexicon names its source
# Subword markers of common tokenizers (SentencePiece, GPT-2 byte-level, WordPiece).
_MARKERS = ("\u2581", "\u0120", "##")


def clean_token(text: str) -> str:
  """A token's surface text without subword markers or surrounding space."""
  for m in _MARKERS:
    text = text.replace(m, "")
  return text.strip()


def script_of(text: str) -> str:
  """``en`` (Latin letters), ``ja`` (hiragana, katakana, CJK), ``digit`` or ``none``.

  Decided by the letters of the token: Japanese if any kana/kanji, else English if any Latin
  letter, else ``digit`` if any digit.
  """
  has_latin = has_digit = False
  for ch in clean_token(text):
    code = ord(ch)
    if (0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF or 0xFF66 <= code <= 0xFF9D):
      return "ja"
    if ch.isdigit():
      has_digit = True
    elif ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
      has_latin = True
  return "en" if has_latin else "digit" if has_digit else "none"


@dataclasses.dataclass(frozen=True)
class Entry:
  concept: str
  category: str
  language: str | None = None


@dataclasses.dataclass
class Lexicon:
  """Surface form -> :class:`Entry`; ``source`` says where it came from."""

  entries: dict[str, Entry]
  source: str = ""

  @property
  def ground_truth(self) -> bool:
    """A toy world's own lexicon: the labels it gives are the truth, not a guess."""
    return self.source.startswith(TOY_SOURCE)

  def lookup(self, token_text: str) -> Entry | None:
    return self.entries.get(clean_token(token_text))

  def __len__(self) -> int:
    return len(self.entries)


def load_lexicon(path: str | Path) -> Lexicon:
  """Read a TSV lexicon: ``form<TAB>concept<TAB>category[<TAB>language]`` per line."""
  path = paths.as_path(path)
  if not path.is_file():
    raise ConfigError(f"lexicon file {path} does not exist")
  entries: dict[str, Entry] = {}
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    parts = line.rstrip("\n").split("\t")
    if len(parts) not in (3, 4) or not all(p.strip() for p in parts):
      raise DataError(f"lexicon {path} line {n} is malformed ({line[:60]!r}); expected "
                      "form<TAB>concept<TAB>category[<TAB>language]")
    form = clean_token(parts[0])
    entry = Entry(parts[1].strip(), parts[2].strip(),
                  parts[3].strip() if len(parts) == 4 else None)
    if form in entries and entries[form] != entry:
      raise DataError(f"lexicon {path} line {n}: form {form!r} is listed twice with different "
                      "concepts")
    entries[form] = entry
  if not entries:
    raise DataError(f"lexicon {path} has no entries")
  return Lexicon(entries, str(path))


def toy_world(model_dir: str | Path) -> World | None:
  """The toy world a toy model was trained on (from its ``world.json``), or None."""
  summary_path = paths.as_path(model_dir) / "world.json"
  if not summary_path.exists():
    return None
  summary = store.read_json(summary_path)
  return World(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in summary["world"].items()}))


def toy_lexicon(model_dir: str | Path) -> Lexicon | None:
  """The toy world's lexicon (its ground truth), or None if ``model_dir`` is not a toy model.

  A form written alike in both languages (a name, a loanword) has no language of its own."""
  world = toy_world(model_dir)
  if world is None:
    return None
  entries = {}
  for c in world.concepts:
    for lang in ("en", "ja"):
      for form in getattr(c, lang):
        entries[form] = Entry(str(c.id), c.category,
                              None if form in world.shared_forms else lang)
  # Function words (the, は, を, .) and digits carry no concept: left out, so a feature on them
  # is token-level or "other", never a semantic category of its own.
  return Lexicon(entries, f"{TOY_SOURCE} {paths.as_path(model_dir) / 'world.json'}")
