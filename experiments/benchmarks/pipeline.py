r"""Text -> SAE steps on a device mesh: the on-device data path against the bare sharded forward
on the same batches, the host-mixer path beside it, how well each mixes, and the activation
cache's write and read MB/s. One JSON object per line.

Lines:
  forward        the bare sharded forward over every token batch (model on the mesh)
  sae_step       the SAE step alone on one resident batch, per token
  device_mix     text -> forward -> on-device mixing buffer -> sharded SAE batches (no step)
  device_train   the same, each batch fed to the SAE step: the trace's stream path
  host_mix / host_train   the host mixer (np.asarray per forward batch, numpy permutation,
                 BatchStream, then back to the devices), without and with the step
  mixing         token correlation inside SAE batches: the share of token pairs from one
                 document and the lag-1 correlation of document ids, for the unmixed order,
                 the host mixer and the device buffer at several buffer sizes
  cache_write / cache_read   the activation cache (tensorstore), per dtype

``ratio_to_forward`` = (seconds of the forward) / (seconds of the path) over the same tokens. The
target model is the toy world's Llama with random weights at the flags' width and depth (no
download). On CPU, 8 host devices are forced (``--cpu_devices``) before JAX starts. On a busy
machine the figures are noisy: each is the best of ``--repeats`` passes.

  python experiments/benchmarks/pipeline.py
  python experiments/benchmarks/pipeline.py --mesh_data=2 --mesh_model=4 --d_model=512

``pipeline_results.jsonl``: ``--docs=2000`` on the 8-device CPU mesh (data=8) of a 2-core
machine shared with three other jobs (load average ~11): the forward reference itself varied
2x between runs, so read the ratios as "the data path is not the bottleneck", not to 10%.
Idle figures: ``cpu/round7/pipeline.jsonl`` (8 CPU devices: device_mix 0.975, device_train
0.759 where running the forward and the step one after the other on the same two cores bounds
it at 0.754) and ``gpu_h200/round8/pipeline_30k.jsonl`` (one H200, ``--d_model=1024
--n_layers=8 --batch=256 --sae_batch=16384 --docs=30000 --repeats=3 --cache=false``:
device_mix 1.006, device_train 0.919, host_train 0.154).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

# Not this folder on the path: a sibling benchmark module could shadow a package that
# transformers probes for (a ``kernels.py`` here once hid Hugging Face's ``kernels``).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 256, "toy LM width")
flags.DEFINE_integer("n_layers", 6, "toy LM depth")
flags.DEFINE_integer("batch", 32, "sequences per forward")
flags.DEFINE_integer("docs", 3000, "documents")
flags.DEFINE_integer("sae_batch", 1024, "tokens per SAE step")
flags.DEFINE_integer("expansion", 4, "SAE latents per model dimension")
flags.DEFINE_integer("mesh_data", -1, "mesh 'data' axis (-1: the rest)")
flags.DEFINE_integer("mesh_model", 1, "mesh 'model' axis")
flags.DEFINE_integer("cpu_devices", 8, "host devices forced on CPU")
flags.DEFINE_integer("repeats", 2, "passes per path (the best is reported)")
flags.DEFINE_bool("cache", True, "also time the activation cache")
flags.DEFINE_string("hook", None, "hook (default: the middle block's resid_post)")


def _force_cpu_devices() -> None:
  if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and "jax" not in sys.modules:
    flag = f"--xla_force_host_platform_device_count={FLAGS.cpu_devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _best(fn, repeats: int) -> float:
  """Best seconds of ``repeats`` calls of fn (it blocks on its own results)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def same_doc_pair_share(doc, b: int) -> float:
  """Share of token pairs inside each [b] SAE batch that come from one document."""
  import numpy as np
  same = total = 0
  for i in range(len(doc) // b):
    _, counts = np.unique(doc[i * b:(i + 1) * b], return_counts=True)
    same += int((counts * (counts - 1) // 2).sum())
    total += b * (b - 1) // 2
  return same / max(total, 1)


def lag1_doc_correlation(doc) -> float:
  """Share of neighbouring rows from one document (1: unmixed runs, ~0: mixed)."""
  import numpy as np
  return float(np.mean(doc[1:] == doc[:-1]))


def mixing_lines(model, cfg, hook, mesh, b: int, common: dict):
  """Token correlation of the unmixed order, the host mixer and the device buffer."""
  import numpy as np

  import sae_jax as sj
  from sae_jax.data.activations import ActivationStream
  from sae_jax.data.device_mix import DeviceStream
  for bb in (1, 4, 16):
    c = cfg.replace(buffer_batches=bb)
    host = ActivationStream(model, sj.data.token_batches(model, c), [hook], bb, c.seed)
    dev = DeviceStream(host, mesh)
    dev_doc = np.concatenate([dev.round_meta(r).doc for r in range(dev.n_rounds)])
    host_doc = np.concatenate([_host_round_doc(host, r) for r in range(host.n_rounds)])
    unmixed = np.concatenate([_host_round_doc(host, r, mixed=False)
                              for r in range(host.n_rounds)])
    uniform = np.random.default_rng(0).permutation(unmixed)  # one shuffle of everything
    for name, doc in (("unmixed", unmixed), ("host_mixer", host_doc), ("device_buffer", dev_doc),
                      ("uniform", uniform)):
      print(json.dumps({"name": "mixing", **common, "order": name, "buffer_batches": bb,
                        "sae_batch": b, "same_doc_pair_share": round(same_doc_pair_share(doc, b),
                                                                     6),
                        "lag1_same_doc": round(lag1_doc_correlation(doc), 6),
                        "identical_to_host": bool(np.array_equal(doc, host_doc))}), flush=True)


def _host_round_doc(host, r: int, mixed: bool = True):
  """The host mixer's document ids of round r, from the token batches (what round_rows gives,
  without the forward); ``mixed=False``: in forward order."""
  import numpy as np

  from sae_jax.data.activations import keep_mask
  lo, hi = r * host.buffer_batches, min((r + 1) * host.buffer_batches, len(host.batches))
  parts = [host.batches[i] for i in range(lo, hi)]
  doc = np.concatenate([p.doc[keep_mask(p, host.special_ids)] for p in parts])
  return doc[np.random.default_rng([host.seed, r]).permutation(len(doc))] if mixed else doc


def main(argv):
  del argv
  import sae_jax as sj
  from sae_jax import sharding
  from sae_jax.toy.lm import LMConfig, train_toy_lm
  from sae_jax.toy.world import WorldConfig

  mesh = sharding.make_mesh(sj.MeshConfig(data=FLAGS.mesh_data, model=FLAGS.mesh_model))
  with tempfile.TemporaryDirectory() as d:
    lm = LMConfig(d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=4,
                  d_mlp=3 * FLAGS.d_model, steps=0, train_docs=100, eval_docs=10)
    train_toy_lm(d, WorldConfig(), lm, log_fn=lambda s: None)
    model = sj.load_model(d, revision="step0", mesh=mesh)
    hook = FLAGS.hook or f"resid_post.{FLAGS.n_layers // 2 - 1}"
    cfg = sj.DataConfig(source="toy", path=d, max_docs=FLAGS.docs, batch_size=FLAGS.batch,
                        ctx_len=40, buffer_batches=16)
    batches = sj.data.token_batches(model, cfg)
    common = time_paths(model, batches, cfg, hook, mesh)
    mixing_lines(model, cfg, hook, mesh, FLAGS.sae_batch, common)
    if FLAGS.cache:
      cache_lines(d, model, batches, hook, common["kept_tokens"], common)


def time_paths(model, batches, cfg, hook, mesh) -> dict:
  """The forward, the SAE step, and both data paths with and without it; returns the fields
  every line shares."""
  import jax

  import sae_jax as sj
  from sae_jax import distributed
  from sae_jax.data.activations import ActivationStream, HookRows, prefetch
  from sae_jax.data.device_mix import DeviceBatches, DeviceStream
  from sae_jax.train.data import BatchStream
  from sae_jax.train.state import init_train_state
  from sae_jax.train.step import make_train_step

  host = ActivationStream(model, batches, [hook], cfg.buffer_batches, cfg.seed)
  dev = DeviceStream(host, mesh)
  kept, b = sum(dev.round_size(r) for r in range(dev.n_rounds)), FLAGS.sae_batch
  common = {"hook": hook, "d_model": FLAGS.d_model, "n_layers": FLAGS.n_layers,
            "batch": FLAGS.batch, "forward_batches": len(batches), "kept_tokens": kept,
            "mesh": dict(mesh.shape), "backend": jax.devices()[0].platform,
            "devices": jax.device_count(), "cores": os.cpu_count()}
  sae_cfg = sj.SAEConfig(architecture="topk", d_in=FLAGS.d_model,
                         d_sae=FLAGS.expansion * FLAGS.d_model, k=16)
  tcfg = sj.TrainConfig(batch_size=b, auxk_coef=0.0)
  step = make_train_step(sae_cfg, tcfg, mesh)
  first = next(iter(DeviceBatches(dev, b, None, hook=hook)))
  state = [init_train_state(sae_cfg, tcfg, mesh, first)]

  def forward():
    put = lambda a: distributed.to_global(a, dev.ids_sharding)
    out = None
    for _, (ids, mask) in prefetch((batches[i] for i in range(len(batches))), put):
      out = model.activations(ids, [hook], attention_mask=mask)
    jax.block_until_ready(out)

  def consume(source, train: bool):
    def run():
      x = None
      for x in source():
        if train:
          state[0], _ = step(state[0], x)
      jax.block_until_ready(state[0] if train else x)
    return run

  device = lambda: DeviceBatches(dev, b, None, hook=hook)
  host_rows = lambda: (distributed.to_global(x, step.x_sharding) for x in BatchStream(
      HookRows(host, hook), b, FLAGS.d_model, 0, None))
  for fn in (forward, consume(device, True), consume(host_rows, True)):
    print("warm-up", fn.__qualname__, file=sys.stderr, flush=True)
    fn()  # compile every program once before timing
  t_fwd = _best(forward, FLAGS.repeats)
  print(json.dumps({"name": "forward", **common, "tokens_per_s": round(kept / t_fwd, 1)}),
        flush=True)
  def one_step():
    state[0], _ = step(state[0], first)  # the state is donated: keep the new one
    jax.block_until_ready(state[0])

  one_step()
  t_step = _best(one_step, 5)
  print(json.dumps({"name": "sae_step", **common, "sae_batch": b,
                    "tokens_per_s": round(b / t_step, 1)}), flush=True)
  tokens = (kept // b) * b
  for name, src, train in (("device_mix", device, False), ("device_train", device, True),
                           ("host_mix", host_rows, False), ("host_train", host_rows, True)):
    t = _best(consume(src, train), FLAGS.repeats)
    print(json.dumps({"name": name, **common, "sae_batch": b, "sae_steps": kept // b,
                      "tokens_per_s": round(tokens / t, 1),
                      "ratio_to_forward": round((t_fwd * tokens / kept) / t, 3)}), flush=True)
  return common


def cache_lines(d, model, batches, hook, kept, common):
  import numpy as np

  from sae_jax.data.cache import CacheReader, write_cache
  for dtype in ("bfloat16", "float32"):
    path = f"{d}/cache_{dtype}"
    t = time.perf_counter()
    write_cache(path, model, batches, hook, dtype, log_fn=lambda s: None)
    t_w = time.perf_counter() - t
    mb = kept * FLAGS.d_model * np.dtype(dtype if dtype == "float32" else "float16").itemsize / 2**20
    t = time.perf_counter()
    got = sum(len(c) for c in CacheReader(path))
    t_r = time.perf_counter() - t
    assert got == kept
    print(json.dumps({"name": "cache_write", **common, "dtype": dtype,
                      "mb_per_s": round(mb / t_w, 1), "tokens_per_s": round(kept / t_w, 1),
                      "note": "includes the forward"}), flush=True)
    print(json.dumps({"name": "cache_read", **common, "dtype": dtype,
                      "mb_per_s": round(mb / t_r, 1), "tokens_per_s": round(kept / t_r, 1)}),
          flush=True)


if __name__ == "__main__":
  flags.FLAGS(sys.argv, known_only=True)
  _force_cpu_devices()
  app.run(main)
