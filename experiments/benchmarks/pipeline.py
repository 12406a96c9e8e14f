r"""Text -> activations: the pipeline's tokens/s against the bare model forward on the same
batches, and the activation cache's write and read MB/s. One JSON object per line.

The target model is the toy world's Llama (random weights at the width/depth given by flags:
throughput does not depend on training), so the benchmark needs no download.

  python experiments/benchmarks/pipeline.py
  python experiments/benchmarks/pipeline.py --d_model=512 --n_layers=8 --batch=32
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 256, "toy LM width")
flags.DEFINE_integer("n_layers", 6, "toy LM depth")
flags.DEFINE_integer("batch", 32, "sequences per forward")
flags.DEFINE_integer("docs", 6000, "documents")
flags.DEFINE_string("hook", None, "hook (default: the middle block's resid_post)")


def main(argv):
  del argv
  import jax
  import numpy as np

  import sae_jax as sj
  from sae_jax.data.activations import ActivationStream
  from sae_jax.data.cache import CacheReader, write_cache
  from sae_jax.toy.lm import LMConfig, train_toy_lm
  from sae_jax.toy.world import WorldConfig

  with tempfile.TemporaryDirectory() as d:
    lm = LMConfig(d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=4,
                  d_mlp=3 * FLAGS.d_model, steps=0, train_docs=100, eval_docs=10)
    train_toy_lm(d, WorldConfig(), lm, log_fn=lambda s: None)
    model = sj.load_model(d, revision="step0")
    hook = FLAGS.hook or f"resid_post.{FLAGS.n_layers // 2 - 1}"
    cfg = sj.DataConfig(source="toy", path=d, max_docs=FLAGS.docs, batch_size=FLAGS.batch,
                        ctx_len=40, buffer_batches=16)
    batches = sj.data.token_batches(model, cfg)
    stream = ActivationStream(model, batches, [hook], cfg.buffer_batches, 0)
    kept = sum(stream.round_size(r) for r in range(stream.n_rounds))
    common = {"hook": hook, "d_model": FLAGS.d_model, "n_layers": FLAGS.n_layers,
              "batch": FLAGS.batch, "batches": len(batches),
              "backend": jax.devices()[0].platform}
    # Warm up both paths (compilation), then time each over all batches.
    jax.block_until_ready(model.activations(batches[0].ids, [hook], batches[0].mask))
    dev = [(jax.device_put(batches[i].ids), jax.device_put(batches[i].mask))
           for i in range(len(batches))]
    t = time.perf_counter()
    for ids, mask in dev:
      out = model.activations(ids, [hook], attention_mask=mask)
    jax.block_until_ready(out)
    t_fwd = time.perf_counter() - t
    print(json.dumps({"name": "forward", **common, "tokens_per_s": round(kept / t_fwd, 1)}),
          flush=True)
    t = time.perf_counter()
    n = sum(len(c.token) for c in stream)
    t_pipe = time.perf_counter() - t
    assert n == kept
    print(json.dumps({"name": "pipeline", **common, "tokens_per_s": round(kept / t_pipe, 1),
                      "ratio_to_forward": round(t_fwd / t_pipe, 3)}), flush=True)
    for dtype in ("bfloat16", "float32"):
      path = f"{d}/cache_{dtype}"
      t = time.perf_counter()
      write_cache(path, model, batches, hook, dtype, log_fn=lambda s: None)
      t_w = time.perf_counter() - t
      mb = kept * FLAGS.d_model * np.dtype(dtype if dtype == "float32" else "float16").itemsize / 2**20
      reader = CacheReader(path)
      t = time.perf_counter()
      got = sum(len(c) for c in reader)
      t_r = time.perf_counter() - t
      assert got == kept
      print(json.dumps({"name": "cache_write", **common, "dtype": dtype,
                        "mb_per_s": round(mb / t_w, 1), "tokens_per_s": round(kept / t_w, 1),
                        "note": "includes the forward"}), flush=True)
      print(json.dumps({"name": "cache_read", **common, "dtype": dtype,
                        "mb_per_s": round(mb / t_r, 1), "tokens_per_s": round(kept / t_r, 1)}),
            flush=True)


if __name__ == "__main__":
  app.run(main)
