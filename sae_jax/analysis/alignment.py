"""The model's own ground truth, independent of any SAE: how aligned its representations of
translation-equivalent words are at a hook, and how concept-like (vs form-like) they are.

Read from monolingual documents of the toy world (so no context holds the other language, and
nothing but the model's weights can align the two), at every word that carries a concept and
whose form belongs to one language only (names, loanwords and digits are written alike in both
languages: they would align trivially). Each language's vectors are centred on their own mean
first (the language direction itself is not alignment).

* ``cross_language_probe``: a ridge classifier of the concept, trained on one language's word
  vectors and tested on the other's (both directions, averaged): its balanced accuracy (mean
  recall over concepts, so frequent concepts earn nothing) against a permutation null (the
  concepts relabelled at random; mean 1 / concepts) with its 95 % range and a p-value.
* ``similarity_gap``: the cosine of a concept's centroid in one language with its centroid in
  the other (translations), or of two synonym forms of one concept in one language (synonyms),
  minus the cosine of matched pairs of different concepts of the same category (the null),
  per concept, averaged with a 95 % interval over concepts. Synonyms above the null:
  concept-like; at the null: form-like.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_jax.toy.lm import encode
from sae_jax.toy.world import World


@dataclasses.dataclass(frozen=True)
class WordVectors:
  """Word occurrences and their vectors at one hook.

  Attributes:
    x: [N, D] activations. concept, form: [N] int concept id and form index within its
    language. category: [N] object. lang: [N] object, ``en`` or ``ja``.
  """

  x: np.ndarray
  concept: np.ndarray
  form: np.ndarray
  category: np.ndarray
  lang: np.ndarray

  def of(self, lang: str) -> "WordVectors":
    m = self.lang == lang
    return WordVectors(self.x[m], self.concept[m], self.form[m], self.category[m], self.lang[m])


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Cross-language concept probe: balanced accuracy (the mean over concepts of the share of
  its test occurrences predicted right) with a 95 % interval over concepts; its null: the same
  predictions with the concepts relabelled at random (as a probe trained on permuted concepts
  predicts), whose mean is chance (1 / concepts) and whose spread counts the predictions'
  concentration on a few concepts; p: the share of relabellings reading at least as high;
  the test occurrences; the concepts present in both languages."""

  accuracy: float
  lo: float
  hi: float
  null: float
  null_lo: float
  null_hi: float
  p: float
  n: int
  concepts: int


def _centred(x: np.ndarray) -> np.ndarray:
  return x - x.mean(0, keepdims=True)


def _ridge_predict(x_tr, y_tr, x_te, n_classes: int, ridge: float) -> np.ndarray:
  """Ridge regression onto one-hot classes (float64, closed form); [M] predicted class."""
  x_tr = x_tr.astype(np.float64)
  scale = np.sqrt((x_tr ** 2).sum(1).mean()) + 1e-12  # ridge relative to the vectors' size
  a, b = x_tr / scale, x_te.astype(np.float64) / scale
  y = np.eye(n_classes)[y_tr]
  w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ (y - y.mean(0)))
  return np.argmax(b @ w, axis=1)


def _recalls(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
  """[k] share of each class's occurrences predicted right (NaN for a class absent)."""
  n_c = np.bincount(true, minlength=k).astype(float)
  hit_c = np.bincount(true[pred == true], minlength=k).astype(float)
  return np.where(n_c > 0, hit_c / np.maximum(n_c, 1), np.nan)


def cross_language_probe(wv: WordVectors, ridge: float = 1e-3, n_null: int = 1000,
                         seed: int = 0) -> ProbeResult:
  """Train on one language, test on the other, both directions (see the module docstring).

  A concept's recall is averaged over the two directions; the accuracy is the mean over
  concepts, its interval the normal one over concepts. The null relabels the predictions by a
  random permutation of the concepts: exactly what the probe trained on permuted concepts
  predicts (ridge regression onto one-hot classes is equivariant to relabelling them).
  """
  en, ja = wv.of("en"), wv.of("ja")
  shared = np.intersect1d(en.concept, ja.concept)
  nan = float("nan")
  if shared.size < 2:
    return ProbeResult(nan, nan, nan, nan, nan, nan, nan, 0, int(shared.size))
  index = {int(c): i for i, c in enumerate(shared)}
  sides = []
  for side in (en, ja):
    keep = np.isin(side.concept, shared)
    sides.append((_centred(side.x[keep]), np.asarray([index[int(c)] for c in side.concept[keep]])))
  k = shared.size
  runs = [(_ridge_predict(x_tr, y_tr, x_te, k, ridge), y_te)
          for (x_tr, y_tr), (x_te, y_te) in ((sides[0], sides[1]), (sides[1], sides[0]))]
  score = lambda relabel: np.mean([_recalls(relabel[p], y, k) for p, y in runs], axis=0)
  r = score(np.arange(k))
  acc = float(r.mean())
  half = 1.96 * float(r.std(ddof=1)) / np.sqrt(r.size)
  rng = np.random.default_rng(seed)
  null = np.asarray([score(rng.permutation(k)).mean() for _ in range(n_null)])
  return ProbeResult(acc, float(max(acc - half, 0.0)), float(min(acc + half, 1.0)),
                     float(null.mean()), float(np.quantile(null, 0.025)),
                     float(np.quantile(null, 0.975)), float((null >= acc - 1e-12).mean()),
                     sum(len(y) for _, y in runs), int(k))


def _centroids(wv: WordVectors, by_form: bool) -> dict[tuple, tuple[np.ndarray, str]]:
  """(concept[, form]) -> (unit centroid of the centred vectors, category)."""
  x = _centred(wv.x)
  keys = np.stack([wv.concept, wv.form if by_form else np.zeros_like(wv.form)], 1)
  uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  sums = np.zeros((len(uniq), x.shape[1]))
  np.add.at(sums, inverse, x)
  norms = np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12
  first = np.zeros(len(uniq), np.int64)
  first[inverse[::-1]] = np.arange(len(inverse))[::-1]
  return {(tuple(int(v) for v in k) if by_form else (int(k[0]),)): (s / n, wv.category[i])
          for k, s, n, i in zip(uniq, sums, norms, first)}


def _gap(diffs: list[float], pairs: list[float], nulls: list[float]) -> dict:
  """The mean per-concept difference (pair cosine minus its null) with a normal 95 % interval
  over concepts (the unit that varies: pairs sharing a centroid are not independent)."""
  nan = float("nan")
  if not diffs:
    return {"gap": nan, "lo": nan, "hi": nan, "pairs": 0, "pair_cosine": nan,
            "null_cosine": nan}
  d = np.asarray(diffs)
  gap = float(d.mean())
  half = 1.96 * float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else nan
  return {"gap": gap, "lo": gap - half, "hi": gap + half, "pairs": int(d.size),
          "pair_cosine": float(np.mean(pairs)), "null_cosine": float(np.mean(nulls))}


def similarity_gap(wv: WordVectors, kind: str) -> dict:
  """``kind`` "translation": a concept's centroids across languages; "synonym": the forms of
  one concept within a language. Each concept's pair cosine minus its matched null (its
  centroids against those of the other concepts of its category)."""
  diffs, pairs, nulls = [], [], []

  def add(pair: list[float], null: list[float]) -> None:
    if pair and null:
      diffs.append(float(np.mean(pair)) - float(np.mean(null)))
      pairs.append(float(np.mean(pair)))
      nulls.append(float(np.mean(null)))

  if kind == "translation":
    a, b = _centroids(wv.of("en"), False), _centroids(wv.of("ja"), False)
    for (c,), (v, cat) in a.items():
      same = [(c2, u) for (c2,), (u, cat2) in b.items() if cat2 == cat]
      add([float(v @ u) for c2, u in same if c2 == c], [float(v @ u) for c2, u in same if c2 != c])
  else:
    for lang in ("en", "ja"):
      cents = _centroids(wv.of(lang), True)
      for c in dict.fromkeys(k[0] for k in cents):
        mine = [(v, cat) for (c2, _), (v, cat) in cents.items() if c2 == c]
        others = [v for (c2, _), (v, cat) in cents.items() if c2 != c and cat == mine[0][1]]
        pair = [float(mine[i][0] @ mine[j][0]) for i in range(len(mine))
                for j in range(i + 1, len(mine))]
        add(pair, [float(v @ u) for v, _ in mine for u in others])
  return _gap(diffs, pairs, nulls)


def word_vectors(model, world: World, hook: str, n_docs: int = 600, seed: int = 424242,
                 batch: int = 128) -> WordVectors:
  """The vectors at ``hook`` of the single-language words of ``n_docs`` fresh documents (the
  monolingual ones among them)."""
  docs = [d for d in world.documents(n_docs, seed) if d.doc_type in ("en", "ja")]
  length = max(len(d.tokens) for d in docs)
  ids, mask = encode(world, docs, length)
  keep = np.zeros(ids.shape, bool)
  rows = {k: np.zeros(ids.shape, np.int64) for k in ("concept", "form")}
  for r, d in enumerate(docs):
    for t, (tok, cid) in enumerate(zip(d.tokens, d.concept)):
      if cid >= 0 and tok not in world.shared_forms:
        keep[r, t] = True
        rows["concept"][r, t], rows["form"][r, t] = cid, d.form[t]
  xs = [np.asarray(model.activations(ids[i:i + batch], [hook], mask[i:i + batch])[hook],
                   np.float32) for i in range(0, len(docs), batch)]
  x = np.concatenate(xs)[keep]
  concept = rows["concept"][keep]
  lang = np.repeat(np.asarray([d.doc_type for d in docs], dtype=object), keep.sum(1))
  category = np.asarray([world.concepts[c].category for c in concept], dtype=object)
  return WordVectors(x, concept, rows["form"][keep], category, lang)


def model_alignment(wv: WordVectors) -> dict:
  """The model-level ground truth of one checkpoint and hook (JSON-ready)."""
  probe = cross_language_probe(wv)
  return {"probe_accuracy": probe.accuracy, "probe_ci": [probe.lo, probe.hi],
          "probe_null": probe.null, "probe_null_range": [probe.null_lo, probe.null_hi],
          "probe_p": probe.p, "probe_n": probe.n, "concepts": probe.concepts,
          "translation_similarity": similarity_gap(wv, "translation"),
          "synonym_similarity": similarity_gap(wv, "synonym")}
