"""The built-in bilingual toy world: a corpus whose every token carries its ground truth.

What it contains
  * A shared inventory of concepts (default 232: 200 nouns in seven categories - animal, food,
    place, tool, person, vehicle, plant - 20 adjectives of colour and size, 12 verbs). Every
    concept has one to three English surface forms (Latin-script pseudo-words) and one to three
    Japanese surface forms (kana pseudo-words): synonyms inside a language, translations across.
  * Grammars with each language's own word order: English SVO with articles
    ("the red dog eats the fish ."), Japanese SOV with particles ("あかい いぬ は さかな を
    たべる ."), and semantic regularities: which verbs a subject's category allows, which object
    categories a verb takes, so the next word depends on concepts, not only on tokens.
  * Documents that are English only, Japanese only, or parallel (an English sentence followed
    by its Japanese translation, repeated), in configurable proportions.
  * Per-token ground truth: language (en / ja / shared punctuation / special), concept id,
    category, surface-form id and part of speech; and the exact probability the generator gave
    each token given the document so far, so the world's own next-token entropy is known (no
    model can do better on average: the generator's latent choices are recoverable from the text).

Shared tokens, so that a token's language is not its script (as in real Japanese text):
digits (a count before a noun, ``3 dogs`` / ``3 いぬ``), person names written in Latin script in
both languages, and Latin-script loanwords among the Japanese forms of some nouns. Their truth is
the language of the sentence they stand in; the paper's script rule calls a Latin loanword in
Japanese text English, and the per-token truth says Japanese.

What it can test of the paper's findings: language-specific vs bilingual features (scripts
and languages are known per token), token-level vs concept-level features (synonyms and
translations share a concept id; categories group concepts), and their order of appearance over
training. What it cannot: real-world semantics, subword tokenisation effects, long-range
discourse, or frequency effects beyond its uniform draws.

How to scale it up: raise ``nouns_per_category`` / ``n_adjectives`` / ``max_forms`` for a larger
vocabulary, ``sentences_per_doc`` for longer contexts, and the toy LM's size and steps
(``sae_jax/toy/lm.py``); the statistics stay exact at any size.

Words are separated by spaces in both languages (the tokenizer is word-level).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator

import numpy as np

NOUN_CATEGORIES = ("animal", "food", "place", "tool", "person", "vehicle", "plant")
ADJ_CATEGORIES = ("colour", "size")
PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
PERIOD, THE, WA, WO = ".", "the", "は", "を"
SPECIALS = (PAD, BOS, UNK)
FUNCTION_WORDS = {PERIOD: "shared", THE: "en", WA: "ja", WO: "ja"}
DIGITS = tuple(str(n) for n in range(2, 10))  # counts, written alike in both languages

# verb -> (allowed subject categories, allowed object categories)
VERBS = {
    "eat": (("animal", "person"), ("food", "plant")),
    "see": (("animal", "person"), ("animal", "place", "tool", "person", "vehicle", "plant")),
    "visit": (("person",), ("place",)),
    "use": (("person",), ("tool", "vehicle")),
    "ride": (("person",), ("vehicle", "animal")),
    "grow": (("person",), ("plant", "food")),
    "chase": (("animal",), ("animal", "person")),
    "buy": (("person",), ("food", "tool", "vehicle", "plant")),
    "carry": (("animal", "person"), ("tool", "food", "plant")),
    "paint": (("person",), ("tool", "vehicle", "place")),
    "smell": (("animal",), ("food", "plant", "person")),
    "build": (("person",), ("place", "tool")),
}

_EN_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st",
              "tr", "pl", "gr", "sk")
_EN_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_EN_CODAS = ("", "n", "t", "r", "s", "m", "nd", "k")
_KANA = ("か", "き", "く", "け", "こ", "さ", "し", "す", "せ", "そ", "た", "ち", "つ", "て",
         "と", "な", "に", "ぬ", "ね", "の", "ま", "み", "む", "め", "も", "ら", "り", "る",
         "れ", "ろ", "や", "ゆ", "よ", "わ", "は", "ひ", "ふ", "へ", "ほ")


_DRAWN: dict[tuple, list] = {}  # (WorldConfig, n, seed) -> documents, the last few draws


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Size and mix of the world (the defaults make 232 concepts, about 950 words)."""

  seed: int = 0
  nouns_per_category: int = 28  # ~200 nouns over 7 categories (the last gets the remainder)
  n_nouns: int = 200
  n_adjectives: int = 20
  max_forms: int = 3  # surface forms per concept and language: 1..max_forms
  p_adjective: float = 0.3  # each noun is preceded by an adjective with this probability
  sentences_per_doc: int = 3  # monolingual documents; parallel ones hold this many pairs - 1
  doc_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # en, ja, parallel
  n_names: int = 8  # person nouns named alike in both languages (one Latin-script form)
  p_loanword: float = 0.15  # nouns whose Japanese forms include their English form (Latin)
  p_number: float = 0.1  # each noun is preceded by a digit with this probability


@dataclasses.dataclass(frozen=True)
class Concept:
  id: int
  name: str
  pos: str  # noun / adj / verb
  category: str
  en: tuple[str, ...]
  ja: tuple[str, ...]


@dataclasses.dataclass
class Document:
  """One document: tokens (after <bos>) with aligned ground truth and generator log-probs."""

  doc_type: str
  tokens: list[str]
  language: list[str]
  concept: list[int]
  category: list[str]
  form: list[int]
  pos: list[str]
  logprob: list[float]

  @property
  def text(self) -> str:
    return " ".join(self.tokens[1:])  # without <bos>: the tokenizer adds it

  def to_json(self) -> dict:
    return {"doc_type": self.doc_type, "text": self.text, "tokens": self.tokens,
            "labels": {"language": self.language, "concept": self.concept,
                       "category": self.category, "form": self.form, "pos": self.pos},
            "logprob": self.logprob}


class World:
  """The lexicon, grammar and exact probabilities of the toy world."""

  def __init__(self, cfg: WorldConfig = WorldConfig()):
    self.cfg = cfg
    rng = np.random.default_rng([cfg.seed, 7])
    en_words = self._word_pool(rng, "en")
    ja_words = self._word_pool(rng, "ja")
    concepts = []
    per_cat = math.ceil(cfg.n_nouns / len(NOUN_CATEGORIES))
    cats = [NOUN_CATEGORIES[min(i // per_cat, len(NOUN_CATEGORIES) - 1)]
            for i in range(cfg.n_nouns)]
    kinds = ([("noun", c) for c in cats] +
             [("adj", ADJ_CATEGORIES[i % 2]) for i in range(cfg.n_adjectives)] +
             [("verb", v) for v in VERBS])
    shared_rng = np.random.default_rng([cfg.seed, 11])  # names and loanwords
    n_names = 0
    for cid, (pos, cat) in enumerate(kinds):
      n_en, n_ja = (int(rng.integers(1, cfg.max_forms + 1)) for _ in range(2))
      en = tuple(next(en_words) for _ in range(n_en))
      ja = tuple(next(ja_words) for _ in range(n_ja))
      name = cat if pos == "verb" else f"{cat}_{cid}"
      if pos == "noun" and cat == "person" and n_names < cfg.n_names:
        en = ja = (en[0].capitalize(),)  # a name: one Latin-script form in both languages
        name, n_names = f"name_{cid}", n_names + 1
      elif pos == "noun" and shared_rng.random() < cfg.p_loanword:
        ja = ja + en[:1]  # a loanword: the English form among the Japanese synonyms
      concepts.append(Concept(cid, name, pos, "action" if pos == "verb" else cat, en, ja))
    self.concepts = concepts
    self.nouns_by_cat = {c: [x for x in concepts if x.pos == "noun" and x.category == c]
                         for c in NOUN_CATEGORIES}
    self.adjectives = [x for x in concepts if x.pos == "adj"]
    self.verbs = {x.name: x for x in concepts if x.pos == "verb"}
    self.subjects = [x for c in NOUN_CATEGORIES if any(c in v[0] for v in VERBS.values())
                     for x in self.nouns_by_cat[c]]
    # The grammar's lookups, built once (documents are drawn by the ten thousand).
    self._verbs_for = {c: [self.verbs[v] for v, (subj, _) in VERBS.items() if c in subj]
                       for c in NOUN_CATEGORIES}
    self._objects_for = {v: [x for c in objs for x in self.nouns_by_cat[c]]
                         for v, (_, objs) in VERBS.items()}
    self._object_ids = {v: {x.id for x in xs} for v, xs in self._objects_for.items()}
    self.vocab = list(SPECIALS) + list(FUNCTION_WORDS) + list(DIGITS) + list(dict.fromkeys(
        w for x in concepts for w in x.en + x.ja))
    assert len(set(self.vocab)) == len(self.vocab)
    self.word_index = {w: i for i, w in enumerate(self.vocab)}
    self.concept_of = {w: x for x in concepts for w in x.en + x.ja}
    # Forms written alike in both languages (names, loanwords) and the digits: their script
    # does not tell their language.
    self.shared_forms = frozenset(DIGITS) | {w for x in concepts for w in set(x.en) & set(x.ja)}

  @staticmethod
  def _word_pool(rng, lang) -> Iterator[str]:
    """Endless unique pseudo-words of one script, in a seeded order."""
    if lang == "en":
      sylls = [o + v + c for o, v, c in itertools.product(_EN_ONSETS, _EN_VOWELS, _EN_CODAS)]
    else:
      sylls = list(_KANA)
    seen = set(FUNCTION_WORDS)
    while True:
      n = int(rng.integers(2, 4)) if lang == "en" else int(rng.integers(2, 5))
      w = "".join(sylls[int(i)] for i in rng.integers(0, len(sylls), n))
      if w not in seen:
        seen.add(w)
        yield w

  # ---- the generative process, with exact probabilities ----------------------------------

  def verbs_for(self, subject: Concept) -> list[Concept]:
    return self._verbs_for[subject.category]

  def objects_for(self, verb: Concept) -> list[Concept]:
    return self._objects_for[verb.name]

  def _sample_clause(self, rng):
    """((num, adj, subject), verb, (num, adj, object)); num (a digit) and adj may be None."""
    subj = self.subjects[int(rng.integers(len(self.subjects)))]
    verbs = self.verbs_for(subj)
    verb = verbs[int(rng.integers(len(verbs)))]
    objs = self.objects_for(verb)
    obj = objs[int(rng.integers(len(objs)))]
    adj = lambda: (self.adjectives[int(rng.integers(len(self.adjectives)))]
                   if rng.random() < self.cfg.p_adjective else None)
    num = lambda: (DIGITS[int(rng.integers(len(DIGITS)))]
                   if rng.random() < self.cfg.p_number else None)
    return (num(), adj(), subj), verb, (num(), adj(), obj)

  def _noun_phrase(self, np_, lang, rng, translation, p_noun_concept, toks) -> None:
    """Append ``[digit] [adjective] noun`` as (word, concept|None, pos, logprob) to ``toks``.

    In a translation the concepts (and the digit) are known from the source sentence: only the
    choice among synonyms is uncertain.
    """
    num, adj, noun = np_
    pa, pn = self.cfg.p_adjective, self.cfg.p_number
    forms = lambda c: getattr(c, lang)
    pick = lambda c: forms(c)[int(rng.integers(len(forms(c))))]
    if translation:
      if num is not None:
        toks.append((num, None, "num", 0.0))
      if adj is not None:
        toks.append((pick(adj), adj, "adj", -math.log(len(forms(adj)))))
      toks.append((pick(noun), noun, "noun", -math.log(len(forms(noun)))))
      return
    lead = 0.0  # log P(no digit), carried by the phrase's first word
    if num is not None:
      toks.append((num, None, "num", math.log(pn / len(DIGITS))))
    else:
      lead = math.log(1 - pn)
    if adj is not None:
      toks.append((pick(adj), adj, "adj",
                   lead + math.log(pa / len(self.adjectives) / len(forms(adj)))))
      toks.append((pick(noun), noun, "noun", math.log(p_noun_concept / len(forms(noun)))))
    else:
      toks.append((pick(noun), noun, "noun",
                   lead + math.log((1 - pa) * p_noun_concept / len(forms(noun)))))

  def _render(self, clause, lang: str, rng, translation: bool) -> list[tuple]:
    """Tokens of one sentence as (word, concept|None, pos, logprob)."""
    np_s, verb, np_o = clause
    subj, obj = np_s[2], np_o[2]
    pick = lambda c: getattr(c, lang)[int(rng.integers(len(getattr(c, lang))))]
    forms = lambda c: len(getattr(c, lang))
    toks = []
    verbs = self.verbs_for(subj)
    p_subj = 1 / len(self.subjects)
    if lang == "en":
      toks.append((THE, None, "det", 0.0))
      self._noun_phrase(np_s, lang, rng, translation, p_subj, toks)
      toks.append((pick(verb), verb, "verb", -math.log(forms(verb)) if translation else
                   math.log(1 / len(verbs) / forms(verb))))
      toks.append((THE, None, "det", 0.0))
      self._noun_phrase(np_o, lang, rng, translation, 1 / len(self.objects_for(verb)), toks)
    else:
      self._noun_phrase(np_s, lang, rng, translation, p_subj, toks)
      toks.append((WA, None, "particle", 0.0))
      # SOV: the object comes before the verb, so its probability sums over the verbs.
      w = [1 / len(verbs) * (obj.id in self._object_ids[v.name]) / len(self.objects_for(v))
           for v in verbs]
      self._noun_phrase(np_o, lang, rng, translation, sum(w), toks)
      toks.append((WO, None, "particle", 0.0))
      p_verb = w[verbs.index(verb)] / sum(w)
      toks.append((pick(verb), verb, "verb", -math.log(forms(verb)) if translation else
                   math.log(p_verb / forms(verb))))
    toks.append((PERIOD, None, "punct", 0.0))
    return toks

  def sample_document(self, rng) -> Document:
    """One document with per-token ground truth and exact log-probabilities.

    A token's language is that of the sentence it stands in (a digit, a name or a loanword in
    Japanese text is Japanese), except the function words (``.`` is ``shared``).
    """
    p_en, p_ja, p_par = self.cfg.doc_mix
    u = rng.random()
    doc_type = "en" if u < p_en else "ja" if u < p_en + p_ja else "parallel"
    n = self.cfg.sentences_per_doc
    sentences = []
    if doc_type == "parallel":
      for _ in range(max(n - 1, 1)):
        clause = self._sample_clause(rng)
        sentences.append(("en", self._render(clause, "en", rng, False)))
        sentences.append(("ja", self._render(clause, "ja", rng, True)))
    else:
      for _ in range(n):
        sentences.append((doc_type, self._render(self._sample_clause(rng), doc_type, rng, False)))
    # Which document type it is shows only through the text: the first sentence's language
    # (English opens with "the", Japanese never does) leaves {en, parallel} or {ja}; the next
    # sentence's language settles en vs parallel.
    first_lang = "ja" if doc_type == "ja" else "en"
    p_first = (p_en + p_par) if first_lang == "en" else p_ja
    post_par = p_par / (p_en + p_par)
    doc = Document(doc_type, [BOS], ["special"], [-1], ["special"], [-1], ["bos"], [0.0])
    for s, (sent_lang, sent) in enumerate(sentences):
      for t, (word, concept, pos, lp) in enumerate(sent):
        if s == 0 and t == 0:
          lp += math.log(p_first)
        elif s == 1 and t == 0 and first_lang == "en":
          lp += math.log(post_par if doc_type == "parallel" else 1 - post_par)
        doc.tokens.append(word)
        doc.language.append(FUNCTION_WORDS.get(word) or sent_lang)
        doc.concept.append(concept.id if concept else -1)
        doc.category.append(concept.category if concept else
                            "number" if pos == "num" else "function")
        doc.form.append(getattr(concept, sent_lang).index(word) if concept else -1)
        doc.pos.append(pos)
        doc.logprob.append(lp)
    return doc

  def documents(self, n: int, seed: int) -> list[Document]:
    """``n`` documents drawn with ``seed`` (the same for the same world config, n and seed:
    the last few draws are kept, since a trace draws its training stream at every checkpoint).
    """
    key = (self.cfg, n, seed)
    if key not in _DRAWN:
      rng = np.random.default_rng([self.cfg.seed, seed])
      _DRAWN[key] = [self.sample_document(rng) for _ in range(n)]
      while len(_DRAWN) > 4:
        _DRAWN.pop(next(iter(_DRAWN)))
    return list(_DRAWN[key])

  def entropy(self, docs: list[Document]) -> float:
    """Mean next-token entropy (nats) over the predicted tokens (all but <bos>)."""
    lps = [lp for d in docs for lp in d.logprob[1:]]
    return -float(np.mean(lps))

  @property
  def max_doc_tokens(self) -> int:
    per_sentence = 11  # the NUM ADJ N VERB the NUM ADJ N .
    n = self.cfg.sentences_per_doc
    return 1 + per_sentence * max(n, 2 * max(n - 1, 1))

  # ---- tokenizer ---------------------------------------------------------------------------

  def tokenizer(self):
    """A word-level Hugging Face fast tokenizer that prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(self.word_index, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, self.word_index[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD,
                                   unk_token=UNK)
