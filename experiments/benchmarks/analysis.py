r"""Per-feature statistics and labels of a 32,768-latent SAE over 1M evaluation tokens: time and
peak memory of the on-the-fly reduction (never a dense [tokens, d_sae] array).

The top-k codes are synthetic (Zipf-like feature and token frequencies, k=32); the encode that
produces them from activations is measured separately on a slice (d_in 2048) and reported as a
rate, since on this 2-core CPU the 1M-token encode alone is the dense matmul's 1.4e14 FLOPs.

  python experiments/benchmarks/analysis.py                     # 1M tokens, 32,768 latents
  python experiments/benchmarks/analysis.py --tokens=100000     # a quick look
"""

from __future__ import annotations

import json
import resource
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_sae", 32768, "latents")
flags.DEFINE_integer("tokens", 1_000_000, "evaluation tokens")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_integer("vocab", 50_000, "vocabulary size")
flags.DEFINE_integer("seq_len", 64, "tokens per evaluation sequence")
flags.DEFINE_integer("batch", 8192, "tokens per reduction batch")
flags.DEFINE_integer("d_in", 2048, "activation width of the encode-rate measurement")
flags.DEFINE_integer("encode_tokens", 8192, "tokens of the encode-rate measurement")


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv):
  del argv
  import numpy as np

  from sae_jax.analysis import StatsAccumulator, granularity_labels, language_labels
  from sae_jax.analysis.lexicon import Entry, Lexicon
  from sae_jax.analysis.stats import add_strong_firings
  rng = np.random.default_rng(0)
  n, k, m, v, t = FLAGS.tokens, FLAGS.k, FLAGS.d_sae, FLAGS.vocab, FLAGS.seq_len
  pf = 1.0 / np.arange(1, m + 1) ** 0.8
  pt = 1.0 / np.arange(1, v + 1)
  ids = rng.choice(v, size=n, p=pt / pt.sum()).astype(np.int32)
  indices = rng.choice(m, size=(n, k), p=pf / pf.sum()).astype(np.int32)
  values = rng.random((n, k), dtype=np.float32)
  seq, pos = (np.arange(n) // t).astype(np.int64), (np.arange(n) % t).astype(np.int32)
  lang = (ids % 2).astype(np.int8)
  token_text = [f"w{i}" if i % 2 == 0 else f"か{i}" for i in range(v)]
  lexicon = Lexicon({token_text[i]: Entry(str(i // 4), str(i // 64), "en" if i % 2 == 0 else "ja")
                     for i in range(0, v, 2)})
  base = _rss_gib()
  acc = StatsAccumulator(m, v, n_examples=50)
  t0 = time.perf_counter()
  last = t0
  for lo in range(0, n, FLAGS.batch):
    sl = slice(lo, lo + FLAGS.batch)
    acc.add(values[sl], indices[sl], ids[sl], seq[sl], pos[sl], lang[sl])
    if time.perf_counter() - last > 10:
      last = time.perf_counter()
      print(f"# reduce: {lo + FLAGS.batch:,}/{n:,} tokens", flush=True)
  stats = acc.finish()
  t_reduce = time.perf_counter() - t0
  t0 = time.perf_counter()
  add_strong_firings(stats, values, indices, ids, lang, seq, pos, 0.7)
  t_strong = time.perf_counter() - t0
  grid = np.zeros((int(seq[-1]) + 1, t), np.int32)
  grid[seq, pos] = ids
  lang_grid = np.zeros_like(grid, dtype=np.int8)
  lang_grid[seq, pos] = lang
  t0 = time.perf_counter()
  lang_labels = language_labels(stats, grid, token_text, lang_grid)
  gran = granularity_labels(stats, grid, token_text, lexicon)
  t_labels = time.perf_counter() - t0
  total = t_reduce + t_strong + t_labels
  print(json.dumps({
      "name": "analysis_stats", "d_sae": m, "tokens": n, "k": k, "vocab": v,
      "reduce_s": round(t_reduce, 2), "strong_pass_s": round(t_strong, 2),
      "labels_s": round(t_labels, 2), "total_s": round(total, 2),
      "tokens_per_s": round(n / total), "peak_rss_gib": round(_rss_gib(), 3),
      "rss_before_gib": round(base, 3), "token_keys": int(stats.token_keys.size),
      "live": int(stats.live.sum()),
      "labelled_en": int((lang_labels["language"] == "en").sum()),
      "labelled_token": int((gran["granularity"] == "token").sum())}), flush=True)

  # The encode that feeds the reduction, at the paper's width: a rate on a slice.
  import jax
  import jax.numpy as jnp

  import sae_jax as sj
  from sae_jax.saes.sae import SAE
  from sae_jax.train.state import _init_state
  cfg = sj.SAEConfig(architecture="topk", d_in=FLAGS.d_in, d_sae=m, k=k)
  st = _init_state(cfg, sj.TrainConfig(), None, jax.random.key(0))
  sae = SAE(cfg, st.params, st.buffers)
  x = jax.random.normal(jax.random.key(1), (FLAGS.encode_tokens, FLAGS.d_in))
  enc = jax.jit(lambda a: sae.encode(a))
  jax.block_until_ready(enc(x))
  t0 = time.perf_counter()
  jax.block_until_ready(enc(x))
  rate = FLAGS.encode_tokens / (time.perf_counter() - t0)
  mm = jax.jit(lambda a: a @ sae.params["W_enc"])
  jax.block_until_ready(mm(x))
  t0 = time.perf_counter()
  jax.block_until_ready(mm(x))
  mm_rate = FLAGS.encode_tokens / (time.perf_counter() - t0)
  print(json.dumps({"name": "analysis_encode", "d_in": FLAGS.d_in, "d_sae": m,
                    "tokens_per_s": round(rate), "encoder_matmul_tokens_per_s": round(mm_rate),
                    "ratio_to_encoder_matmul": round(rate / mm_rate, 3),
                    "seconds_for_tokens": round(n / rate, 1)}), flush=True)
  del jnp


if __name__ == "__main__":
  app.run(main)
