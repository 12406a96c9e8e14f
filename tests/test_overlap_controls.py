"""Overlap's controls on tiny planted data: merges and splits, the calibrated threshold, the
random-model and token-identity nulls, the lineage gap, the seed baseline at every checkpoint."""

from pathlib import Path

import numpy as np
import pytest

import sae_jax as sj
from sae_jax.analysis import analyze_overlap, match_activations
from sae_jax.analysis.config import MatchConfig
from sae_jax.analysis.matching import calibrate_threshold, shuffled, token_profile_match
from sae_jax.analysis.merges import find_merges
from sae_jax.store import SAERecord

QUIET = lambda s: None


def _random_codes(rng, n, m, k, low=0.5):
  """k distinct random features per token, values in [low, low + 1)."""
  idx = np.argsort(rng.random((n, m)), 1)[:, :k]
  return (rng.uniform(low, low + 1, (n, k)).astype(np.float32), idx.astype(np.int64))


def test_planted_merges_and_splits_are_found_and_nothing_else():
  rng = np.random.default_rng(0)
  n, m, k = 6000, 40, 2
  va, ia = _random_codes(rng, n, m, k)
  perm = rng.permutation(m)
  ib = perm[ia]
  # Merge: A's features 1 and 2 both become B's feature perm[1] (their sum).
  ib[ia == 2] = perm[1]
  # Split: A's feature 5 becomes perm[5] on half of its tokens, perm[2] (free now) on the rest.
  half = rng.random((n, k)) < 0.5
  ib[(ia == 5) & half] = perm[2]
  vb = (va * rng.uniform(0.9, 1.1, va.shape)).astype(np.float32)
  # Noise: 2 % of B's firings land on a random feature.
  noise = rng.random((n, k)) < 0.02
  ib[noise] = rng.integers(0, m, noise.sum())
  a, b = (va, ia), (vb, ib)
  match = match_activations(a, b, m, m)
  found = find_merges(a, b, match, m, m, threshold=0.5)
  got = sorted((x.kind, x.features_from, x.features_to) for x in found)
  assert got == [("merge", (1, 2), (int(perm[1]),)),
                 ("split", (5,), tuple(sorted((int(perm[2]), int(perm[5])))))], found
  for x in found:  # the parts together explain the whole; each alone does not
    assert x.score > 0.9 and x.best_single < 0.8
  # A plain permutation (no merge, no split) gives none.
  clean = (vb, perm[ia])
  assert find_merges(a, clean, match_activations(a, clean, m, m), m, m, threshold=0.5) == []


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_calibrated_threshold_recovers_the_planted_false_match_rate(rate):
  """Two 'seeds': 80 features shared (the same firings, permuted, values jittered), 400 of
  each unrelated (independent, rare: their correlations are noise). The threshold calibrated
  against shuffled pairings lets about ``rate`` of the unrelated features match."""
  rng = np.random.default_rng(1)
  n, shared, own, k = 3000, 80, 400, 3
  ms = shared + own
  va, ia = _random_codes(rng, n, ms, k, low=0.1)
  # Shared features fire often, unrelated ones rarely: resample A's indices by frequency.
  p = np.r_[np.full(shared, 4.0), np.ones(own)]
  ia = np.stack([rng.choice(ms, n, p=p / p.sum()) for _ in range(k)], 1)
  perm = rng.permutation(shared)
  # B: A's shared firings (permuted; nothing where A's slot is unrelated), then k slots of its
  # own features drawn independently of A.
  own_b = shared + np.stack([rng.choice(own, n, p=p[shared:] / p[shared:].sum())
                             for _ in range(k)], 1)
  ib = np.concatenate([np.where(ia < shared, perm[np.minimum(ia, shared - 1)], 0), own_b], 1)
  vb = np.concatenate([np.where(ia < shared, va * rng.uniform(0.9, 1.1, va.shape), 0),
                       rng.uniform(0.1, 1.1, own_b.shape)], 1).astype(np.float32)
  a, b = (va, ia), (vb, ib)
  mf = 3
  null = match_activations(a, shuffled(b, seed=3), ms, ms, min_firings=mf)
  live = np.bincount(ia.ravel(), minlength=ms) >= mf
  t = calibrate_threshold(null.assignment_score[live], rate)
  assert 0.05 < t < 0.9, t
  real = match_activations(a, b, ms, ms, min_firings=mf)
  hit = (real.assignment >= 0) & (real.assignment_score >= t)
  unrelated = live & (np.arange(ms) >= shared)
  false_rate = hit[unrelated].mean()
  assert 0.4 * rate <= false_rate <= 1.8 * rate, (t, false_rate)
  assert hit[:shared].all()  # every shared feature is matched at the calibrated threshold
  # Sorted scores: exactly floor(rate * n) of the null reach the threshold.
  s = null.assignment_score[live]
  assert (s >= t).sum() <= int(rate * s.size)


def _topic_world(rng, n_seq=300, seq_len=20, vocab=60, topics=12):
  """Tokens with a topic per sequence: [N] token ids and [N] topic ids."""
  topic = np.repeat(rng.integers(0, topics, n_seq), seq_len)
  return rng.integers(0, vocab, n_seq * seq_len), topic


def _detector_codes(rng, label, m, jitter=0.2, k=2, spread=1):
  """Codes of m features that detect ``label`` values (feature f fires where
  label % m == f, ``spread`` features per label value), plus one random firing per token."""
  n = label.shape[0]
  idx = np.stack([label % m, rng.integers(0, m, n)], 1)[:, :k]
  val = np.stack([rng.uniform(1 - jitter, 1 + jitter, n), rng.uniform(0.05, 0.15, n)], 1)
  return val[:, :k].astype(np.float32), idx.astype(np.int64)


def _records(spec):
  """[(checkpoint, step, seed)] -> SAERecords (one hook 'h')."""
  return [SAERecord(c, s, "h", seed, Path("/nowhere") / c, True) for c, s, seed in spec]


class _Cfg:
  def __init__(self, m):
    self.d_sae = m


class _StandIn:
  """What analyze_overlap reads of an SAE: cfg.d_sae and W_dec (decoder matching)."""

  def __init__(self, m, seed):
    self.cfg = _Cfg(m)
    self.params = {"W_dec": np.random.default_rng(seed).normal(size=(m, 8)).astype(np.float32)}


def _labels(m, language="en"):
  lab = np.array([language] * m, object)
  return sj.analysis.FeatureLabels(lab, lab, lab, np.zeros(m), lab, lab)


def test_random_model_null_is_near_zero_against_a_trained_final_sae():
  """The 'trained' checkpoints' features detect topics (context); the random model's SAE
  detects tokens (all a random model's residual carries): the trained final SAE's features
  barely match it, while the trained checkpoints match each other and their seeds."""
  rng = np.random.default_rng(2)
  tokens, topic = _topic_world(rng)
  m = 12
  codes = {("step0", 0, 0): _detector_codes(rng, tokens, m),
           ("step0", 0, 1): _detector_codes(rng, tokens, m),
           ("step5", 5, 0): _detector_codes(rng, topic, m),
           ("step5", 5, 1): _detector_codes(rng, topic, m),
           ("step9", 9, 0): _detector_codes(rng, topic, m),
           ("step9", 9, 1): _detector_codes(rng, topic, m)}
  records = _records(codes)
  by_key = {r.key: codes[(r.checkpoint, r.step, r.seed)] for r in records}
  saes = {r.key: _StandIn(m, i) for i, r in enumerate(records)}
  res = analyze_overlap(records, saes, lambda r: by_key[r.key],
                        {r.key: _labels(m) for r in records}, log_fn=QUIET,
                        cfg=MatchConfig(false_match_rate=0.05), tokens=tokens)
  assert res.threshold_source == "calibrated" and 0 < res.threshold < 0.9
  nulls = {(x.null, x.kind, x.checkpoint): x for x in res.nulls}
  final_null = nulls[("random_model", "random", "step9")]
  assert final_null.overlap <= 0.1 and final_null.observed >= 0.9, final_null
  # The token-identity null: the topic features are not token detectors, so token identity
  # predicts little of step5 -> step9, although the overlap is full.
  tok = nulls[("token_identity", "final", "step5")]
  assert tok.overlap <= 0.2 and tok.observed == 1.0, tok
  seed_rows = [c for c in res.comparisons if c.kind == "seed"]
  assert [c.a for c in seed_rows] == ["step0", "step5", "step9"]
  nxt = {c.a: c for c in res.comparisons if c.kind == "next"}
  assert nxt["step5"].seed_baseline == 1.0 and nxt["step5"].overlap_vs_seed == 1.0
  assert nxt["step0"].overlap <= 0.1  # token detectors do not become topic detectors
  assert [r["in_use"] for r in res.sweep].count(True) == 1


def test_token_identity_null_matches_detectors_of_one_token_that_never_cofire():
  """Two features firing on the same token at disjoint occurrences: their activations do not
  correlate, but token identity alone predicts them to correlate (about 0.5: half of each
  one's variance is its token's); two detectors firing on every occurrence: 1."""
  rng = np.random.default_rng(3)
  n, vocab = 4000, 20
  tokens = rng.integers(0, vocab, n)
  parity = np.arange(n) % 2
  # A: feature v fires on token v at even rows; B: at odd rows (and each SAE has filler).
  ia = np.stack([tokens, vocab + (np.arange(n) % 3)], 1)
  va = np.stack([np.where(parity == 0, 1.0, 0.0), np.full(n, 0.1)], 1).astype(np.float32)
  vb = np.stack([np.where(parity == 1, 1.0, 0.0), np.full(n, 0.1)], 1).astype(np.float32)
  act = match_activations((va, ia), (vb, ia), vocab + 3, vocab + 3)
  prof = token_profile_match((va, ia), (vb, ia), tokens, vocab + 3, vocab + 3)
  assert act.overlap(0.3, np.arange(vocab + 3) < vocab) == 0.0
  assert prof.overlap(0.4, np.arange(vocab + 3) < vocab) == 1.0
  np.testing.assert_array_equal(prof.assignment[:vocab], np.arange(vocab))
  np.testing.assert_allclose(prof.assignment_score[:vocab], 0.5, atol=0.03)
  full = np.stack([np.ones(n), np.full(n, 0.1)], 1).astype(np.float32)
  both = token_profile_match((full, ia), (full, ia), tokens, vocab + 3, vocab + 3)
  np.testing.assert_allclose(both.assignment_score[:vocab], 1.0, atol=1e-5)


def test_lineage_bridges_one_weak_link_and_flags_it():
  """A feature present at A and C but missing (rare) at B: with lineage_gap=1 its chain goes
  A <- ? <- C; with 0 it is born at C. A feature firing below min_firings is not matched."""
  rng = np.random.default_rng(4)
  n, m = 3000, 6
  va, ia = _random_codes(rng, n, m, 2)
  codes_a = (va, ia)
  ib = ia.copy()
  gone = ia == 3
  ib[gone] = np.where(rng.random(gone.sum()) < 0.001, 3, 4 + (rng.random(gone.sum()) < 0.5))
  codes = {"A": codes_a, "B": (va, ib), "C": codes_a}
  records = _records([("A", 1, 0), ("B", 2, 0), ("C", 3, 0)])
  saes = {r.key: _StandIn(m, i) for i, r in enumerate(records)}
  labels = {r.key: _labels(m) for r in records}
  run = lambda gap: {x.feature: x for x in analyze_overlap(
      records, saes, lambda r: codes[r.checkpoint], labels, threshold=0.5, log_fn=QUIET,
      cfg=MatchConfig(lineage_gap=gap, min_firings=5)).lineages}
  with_gap, without = run(1), run(0)
  assert with_gap[3].chain == (3, -1, 3) and with_gap[3].gaps == 1
  assert with_gap[3].birth == "A"
  assert without[3].chain == (3,) and without[3].birth == "C" and without[3].gaps == 0
  assert with_gap[0].chain == (0, 0, 0) and with_gap[0].gaps == 0


def test_seed_baseline_every_final_none_and_old_configs():
  from sae_jax.trace import _seed_revisions
  revs = ["s0", "s1", "s2"]
  mk = lambda sb, n=1: sj.TraceConfig(model="m", seed_baseline=sb, baseline_seeds=n)
  assert _seed_revisions(mk("every"), revs) == set(revs)
  assert _seed_revisions(mk(("final",)), revs) == {"s2"}
  assert _seed_revisions(mk("none"), revs) == set()
  assert _seed_revisions(mk(("s1", "final")), revs) == {"s1", "s2"}
  assert _seed_revisions(mk("every", 0), revs) == set()
  with pytest.raises(sj.errors.ConfigError, match="stand alone"):
    mk(("every", "s1"))
  old = mk(("final",)).to_dict()
  for key in ("match_threshold", "false_match_rate", "min_firings", "lineage_gap"):
    old["outputs"].pop(key)
  assert sj.TraceConfig.from_dict(old).outputs.min_firings == 5  # a config written before


@pytest.mark.parametrize("source, rate", [("default", None), ("fixed", None),
                                          ("calibrated", 0.05)])
def test_report_states_how_the_threshold_was_chosen(source, rate):
  """A threshold that was not calibrated has no false-match rate: the report still renders."""
  import pandas as pd

  from sae_jax.analysis.overlap_results import OverlapResult
  from sae_jax.analysis.report import OVERLAP_COLUMNS, overlap_html
  result = OverlapResult(threshold=0.5, comparisons=[], lineages=[], links={}, checkpoints=[],
                         threshold_source=source, false_match_rate=rate)
  overlap = pd.DataFrame({c: [0.5] for c in OVERLAP_COLUMNS})
  html = overlap_html(overlap, pd.DataFrame(), 0.5, result)
  assert "Threshold 0.500" in html
  assert ("5%" in html) == (source == "calibrated")
