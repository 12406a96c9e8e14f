"""Our SAEs' examples collected as the authors' v1 code collects them (paper_examples.py): a
hand-built SAE whose chosen sequences and quantised values are known, and a literal dense
re-implementation of the authors' procedure on a small random SAE."""

import math

import jax.numpy as jnp
import numpy as np

import sae_jax as sj
from sae_jax.analysis import AnalysisConfig, EvalSet, feature_stats
from sae_jax.analysis.labels import sae_examples
from sae_jax.analysis.paper_examples import first_sequences

# Token types of the hand-built world and the SAE input on each: the SAE is the identity
# (pre-activation = input), k = 1, so a token's top-k code is its largest input (ReLU'd).
HAND = {
    "<bos>": [5.0, 0.0, 0.0],  # position 0: not counted (else feature 0's max would be 5)
    "A": [1.0, 0.0, 0.0],  # feature 0's maximum (threshold 0.7 x 1.0)
    "D": [0.75, 0.0, 0.0],  # feature 0's code above the threshold
    "B": [0.85, 0.9, 0.0],  # feature 0's pre-activation above it, but feature 1 is the top-1
    "C": [0.7, 0.0, 0.0],  # feature 0's code exactly at the threshold: not strictly above
    "N": [0.2, 0.0, 0.1],  # small
    "E": [-0.5, 0.0, 0.3],  # negative for feature 0 (recorded as 0); feature 2's top-1
}
VOCAB = list(HAND)
TABLE = np.asarray([HAND[t] for t in VOCAB], np.float32)


def _identity_sae(k=1):
  m = 3
  cfg = sj.SAEConfig(architecture="topk", d_in=m, d_sae=m, k=k, normalize="none")
  eye = jnp.eye(m, dtype=jnp.float32)
  params = {"W_enc": eye, "b_enc": jnp.zeros(m), "W_dec": eye, "b_dec": jnp.zeros(m)}
  return sj.SAE(cfg, params, {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})


def _hand_evalset():
  """Sequences of BOS + 3 tokens: feature 0 qualifies in kinds 'first' and 'q' only."""
  rows, kinds = [["B", "N", "E"], ["C", "N", "N"], ["D", "B", "E"]], ["B", "tie", "first"]
  for i in range(70):  # 60 qualifying sequences among every fifth that does not
    if i % 5 == 4:
      rows.append(["C", "B", "N"])  # tie, and above the threshold only outside the top-k
      kinds.append("no")
    else:
      rows.append(["N", "D", "N"])
      kinds.append("q")
  rows.append(["A", "N", "N"])  # the max, after more than 50 qualifying sequences
  kinds.append("max")
  ids = np.asarray([[0] + [VOCAB.index(t) for t in r] for r in rows], np.int32)
  mask = np.ones(ids.shape, bool)
  mask[:, 0] = False
  s, t = ids.shape
  return EvalSet(ids, mask, np.repeat(np.arange(s)[:, None], t, 1), np.zeros(ids.shape, np.int8),
                 np.ones(ids.shape, bool), VOCAB, "hand"), kinds


def test_hand_built_sae_gets_the_papers_first_50_sequences_and_values():
  ev, kinds = _hand_evalset()
  st, values, _ = feature_stats(_identity_sae(), ev, lambda ids: TABLE[ids],
                                AnalysisConfig(seqs_per_batch=8))
  assert st.max_pre.tolist() == [1.0, np.float32(0.9), np.float32(0.3)]  # BOS not counted
  feats = {f.feature: f for f in sae_examples(st, ev.ids, ev.mask, ev.token_text)}
  want = [s for s, k in enumerate(kinds) if k in ("first", "q")][:50]
  assert want[0] == 2 and want[-1] == 63 and kinds[64] == "q"  # more qualify after the 50th
  assert st.paper_seq[0].tolist() == want
  ex = feats[0].examples
  assert len(ex) == 50 and ex[0].tokens == ("D", "B", "E")
  # Quantised by the max over the examples (0.85 on B, outside the top-k), not by max_pre 1.0:
  # ceil(10 * 0.75 / 0.85) = 9, ceil(10 * 0.2 / 0.85) = 3; the negative pre-activation -> 0.
  assert float(st.paper_max[0]) == np.float32(0.85)
  assert ex[0].acts == (9, 10, 0)
  assert all(e.tokens == ("N", "D", "N") and e.acts == (3, 9, 3) for e in ex[1:])
  # Feature 1 (top-1 only on B: 0.9 > 0.63) and feature 2 (top-1 on E: 0.3 > 0.21).
  want1 = [s for s in range(len(kinds)) if VOCAB.index("B") in ev.ids[s]][:50]
  assert st.paper_seq[1][:len(want1)].tolist() == want1
  assert (st.paper_seq[1][len(want1):] < 0).all()
  assert feats[1].examples[0].acts == (10, 0, 0)
  assert [s for s in st.paper_seq[2] if s >= 0] == [0, 2]
  assert feats[2].examples[0].acts == (0, 4, 10)  # pre 0 (B), 0.1 (N), 0.3 (E); max 0.3


def test_sequences_split_across_chunks_count_once():
  rng = np.random.default_rng(3)
  seq = np.repeat(np.arange(40), 3)
  values = rng.random((seq.size, 2)).astype(np.float32)
  indices = rng.integers(0, 5, (seq.size, 2)).astype(np.int32)
  max_pre = np.full(5, 1.0, np.float32)
  whole = first_sequences(values, indices, seq, 40, max_pre, n=6)
  for chunk in (1, 2, 4, 7):
    np.testing.assert_array_equal(first_sequences(values, indices, seq, 40, max_pre, n=6,
                                                  chunk=chunk), whole)
  hit = values > 0.7
  for f in range(5):
    ref = sorted({int(s) for s, ok in zip(np.repeat(seq[:, None], 2, 1)[hit], indices[hit] == f)
                  if ok})[:6]
    assert whole[f][:len(ref)].tolist() == ref and (whole[f][len(ref):] == -1).all()


def _dense_reference(sae, x, ids, mask, n=50, fraction=0.7):
  """The authors' procedure, literally, on the dense [tokens, M] pre-activations (float64):
  {feature: [(tokens, quantised acts)]} of every feature with examples."""
  p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
  xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # unit_norm
  pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # [S, T, M]
  max_act = np.maximum(0.0, np.where(mask[..., None], pre, -np.inf).max((0, 1)))
  thr = max_act * fraction
  relu = np.maximum(pre, 0)
  k = sae.cfg.k
  topk = np.argsort(-relu, axis=-1, kind="stable")[..., :k]
  out = {}
  for f in range(pre.shape[-1]):
    records = []
    for s in range(ids.shape[0]):
      cnt = mask[s]
      in_top = (topk[s][cnt] == f).any(-1)
      if (in_top & (relu[s][cnt][:, f] > thr[f])).any() and len(records) < n:
        records.append((s, pre[s][cnt][:, f]))
    if records:
      top = max(max(a) for _, a in records)
      out[f] = [(tuple(VOC[t] for t in ids[s][mask[s]]),
                 tuple(0 if a < 0 else math.ceil(a * 10 / top) for a in acts))
                for s, acts in records]
  return out, max_act


VOC = [f"t{i}" for i in range(30)]


def test_collection_equals_a_dense_literal_reference():
  rng = np.random.default_rng(0)
  d, m, k, s, t = 8, 16, 3, 300, 9
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=m, k=k, normalize="unit_norm")
  params = {"W_enc": jnp.asarray(rng.normal(size=(d, m)), jnp.float32),
            "b_enc": jnp.asarray(rng.normal(size=m) * 0.3, jnp.float32),
            "W_dec": jnp.asarray(rng.normal(size=(m, d)), jnp.float32),
            "b_dec": jnp.asarray(rng.normal(size=d) * 0.2, jnp.float32)}
  sae = sj.SAE(cfg, params, {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})
  table = rng.normal(size=(len(VOC), d)).astype(np.float32)
  pos = rng.normal(size=(t, d)).astype(np.float32)
  ids = rng.integers(0, len(VOC), (s, t)).astype(np.int32)
  mask = np.ones((s, t), bool)
  mask[:, 0] = False  # BOS
  mask[rng.random(s) < 0.3, -2:] = False  # padding at the end of some sequences
  ev = EvalSet(ids, mask, np.repeat(np.arange(s)[:, None], t, 1), np.zeros((s, t), np.int8),
               np.ones((s, t), bool), VOC, "rand")
  acts = lambda x: table[x] + pos[None, :x.shape[1]]  # noqa: E731
  st, _, _ = feature_stats(sae, ev, acts, AnalysisConfig(seqs_per_batch=32))
  want, max_act = _dense_reference(sae, acts(ids).astype(np.float64), ids, mask)
  np.testing.assert_allclose(st.max_pre, max_act, rtol=1e-5)
  got = {f.feature: [(e.tokens, e.acts) for e in f.examples]
         for f in sae_examples(st, ids, mask, VOC) if f.examples}
  assert sorted(got) == sorted(want)
  assert sum(len(v) == 50 for v in want.values()) >= m // 2  # 'first 50' decides for most
  for f in want:
    assert got[f] == want[f], f
