r"""Matching two SAEs at the paper's size: time and peak memory of decoder-direction matching
(32,768 x 32,768 decoder rows of d_in 2048) and activation matching with the merges and
splits between them (top-k codes of both SAEs over 1M evaluation tokens; a hundred planted
merges), each in a fresh process so its peak RSS is its own.

Targets (issue #9, this 2-core machine): each at most 120 s and 8 GiB. Prints one JSON line
per part: name, seconds, peak_rss_gib, and checks against the targets.

  python experiments/benchmarks/overlap.py                    # the full size
  python experiments/benchmarks/overlap.py --d_sae=4096 --tokens=100000   # a quick look
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_sae", 32768, "latents of each SAE")
flags.DEFINE_integer("d_in", 2048, "decoder row width")
flags.DEFINE_integer("tokens", 1_000_000, "evaluation tokens (activation matching)")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_string("part", "", "internal: run one part in this process")

LIMIT_S, LIMIT_GIB = 120.0, 8.0


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _decoders():
  import jax.numpy as jnp
  import numpy as np

  import sae_jax as sj
  from sae_jax.analysis import match_decoders
  from sae_jax.saes.sae import SAE
  rng = np.random.default_rng(0)
  m, d = FLAGS.d_sae, FLAGS.d_in
  wa = rng.standard_normal((m, d), dtype=np.float32)
  # B: half of A's directions (permuted, perturbed) and half new ones.
  perm = rng.permutation(m)
  wb = wa[perm] + 0.3 * rng.standard_normal((m, d), dtype=np.float32)
  wb[m // 2:] = rng.standard_normal((m - m // 2, d), dtype=np.float32)
  cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=m, k=FLAGS.k)
  mk = lambda w: SAE(cfg, {"W_dec": jnp.asarray(w)}, {})
  a, b = mk(wa), mk(wb)
  del wa
  base = _rss_gib()
  t = time.perf_counter()
  m_ = match_decoders(a, b)
  secs = time.perf_counter() - t
  return {"name": "match_decoders", "d_sae": m, "d_in": d, "seconds": round(secs, 2),
          "peak_rss_gib": round(_rss_gib(), 3), "rss_before_gib": round(base, 3),
          "matched_share": round(m_.overlap(0.5), 4)}


def _activations():
  import numpy as np

  from sae_jax.analysis import match_activations
  from sae_jax.analysis.merges import find_merges
  rng = np.random.default_rng(1)
  n, k, m = FLAGS.tokens, FLAGS.k, FLAGS.d_sae
  # Zipf-like feature frequencies, as trained SAEs have.
  p = 1.0 / np.arange(1, m + 1) ** 0.8
  p /= p.sum()
  ia = rng.choice(m, size=(n, k), p=p).astype(np.int32)
  va = rng.random((n, k), dtype=np.float32)
  perm = rng.permutation(m).astype(np.int32)
  ib = perm[ia]
  swap = rng.random((n, k)) < 0.2  # B differs from A on a fifth of its firings
  ib[swap] = rng.integers(0, m, swap.sum())
  vb = (va * rng.uniform(0.8, 1.2, (n, k))).astype(np.float32)
  # A hundred planted merges: B feature perm[2j] also takes the firings of A feature 2j + 1.
  pairs = rng.choice(m // 2, 100, replace=False) * 2
  merged = np.zeros(m, bool)
  merged[pairs + 1] = True
  target = perm.copy()
  target[pairs + 1] = perm[pairs]
  ib = np.where(merged[ia] & ~swap, target[ia], ib)
  base = _rss_gib()
  t = time.perf_counter()
  match = match_activations((va, ia), (vb, ib), m, m, min_firings=5)
  secs_match = time.perf_counter() - t
  found = find_merges((va, ia), (vb, ib), match, m, m, threshold=0.5)
  secs = time.perf_counter() - t
  return {"name": "match_activations+merges", "d_sae": m, "tokens": n, "k": k,
          "seconds": round(secs, 2), "seconds_match": round(secs_match, 2),
          "peak_rss_gib": round(_rss_gib(), 3), "rss_before_gib": round(base, 3),
          "matched_share": round(match.overlap(0.5), 4),
          "merges": sum(x.kind == "merge" for x in found),
          "splits": sum(x.kind == "split" for x in found)}


def main(argv):
  del argv
  if FLAGS.part:
    out = {"decoders": _decoders, "activations": _activations}[FLAGS.part]()
    out["within_targets"] = out["seconds"] <= LIMIT_S and out["peak_rss_gib"] <= LIMIT_GIB
    print(json.dumps(out), flush=True)
    return
  for part in ("decoders", "activations"):
    args = [sys.executable, __file__, f"--part={part}", f"--d_sae={FLAGS.d_sae}",
            f"--d_in={FLAGS.d_in}", f"--tokens={FLAGS.tokens}", f"--k={FLAGS.k}"]
    r = subprocess.run(args, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    print(lines[-1] if lines else json.dumps({"name": part, "error": r.stderr[-500:]}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
