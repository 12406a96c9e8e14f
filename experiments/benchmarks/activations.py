r"""Activation extraction: tokens/s to get resid_post at the middle block, ours vs HF PyTorch.

Both run the same random-weight checkpoint (built with transformers, saved locally, loaded by
our loader), the same batch and dtype, and both stop at the same depth (HF's layer list is cut
after the hooked block, as llm-jp-sae and TransformerLens stop early). One JSON object per line.

  python experiments/benchmarks/activations.py
  python experiments/benchmarks/activations.py --shapes=pythia160m --batch=32 --seq=128
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["pythia160m", "llama_small"], "model shapes to time")
flags.DEFINE_integer("batch", 16, "sequences per batch")
flags.DEFINE_integer("seq", 64, "tokens per sequence (the paper uses 64)")
flags.DEFINE_integer("steps", 6, "timed batches")
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16 (both systems)")

SHAPES = {
    "pythia160m": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=2048)),
    "llama_small": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)),
}


def _time(fn, steps):
  fn()
  fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  times.sort()
  return times[len(times) // 4]


def bench(shape: str) -> None:
  import jax
  import numpy as np
  import torch
  import transformers

  from sae_jax.models import load_model

  cfg_cls, model_cls, kw = SHAPES[shape]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**kw)
  cfg._attn_implementation = "sdpa"
  hf = getattr(transformers, model_cls)(cfg).eval()
  layer = cfg.num_hidden_layers // 2 - 1
  hook = f"resid_post.{layer}"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[FLAGS.dtype]
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours = load_model(d, dtype=FLAGS.dtype)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(FLAGS.batch, FLAGS.seq))
  n_tok = ids.size

  def run_ours():
    jax.block_until_ready(ours.activations(ids, [hook])[hook])

  t_ours = _time(run_ours, FLAGS.steps)
  # HF stopped at the same depth: drop the blocks after the hooked one.
  base = hf.gpt_neox if hasattr(hf, "gpt_neox") else hf.model
  base.layers = base.layers[:layer + 1]
  base = base.to(tdtype)
  caught = {}
  base.layers[layer].register_forward_hook(
      lambda m, a, out: caught.__setitem__("x", out[0] if isinstance(out, tuple) else out))
  tids = torch.tensor(ids)

  def run_hf():
    with torch.inference_mode():
      base(input_ids=tids, use_cache=False)

  t_hf = _time(run_hf, FLAGS.steps)
  gap = float(np.abs(np.asarray(ours.activations(ids, [hook])[hook]) -
                     caught["x"].float().numpy()).max())
  common = {"shape": shape, "hook": hook, "batch": FLAGS.batch, "seq": FLAGS.seq,
            "dtype": FLAGS.dtype, "backend": jax.devices()[0].platform,
            "torch_threads": torch.get_num_threads()}
  print(json.dumps({"name": f"hf_torch_{shape}", **common, "step_s": round(t_hf, 4),
                    "tokens_per_s": round(n_tok / t_hf, 1)}), flush=True)
  print(json.dumps({"name": f"sae_jax_{shape}", **common, "step_s": round(t_ours, 4),
                    "tokens_per_s": round(n_tok / t_ours, 1),
                    "speedup_vs_hf": round(t_hf / t_ours, 2), "max_abs_diff_vs_hf": gap}),
        flush=True)


def main(argv):
  del argv
  for shape in FLAGS.shapes:
    bench(shape)


if __name__ == "__main__":
  app.run(main)
