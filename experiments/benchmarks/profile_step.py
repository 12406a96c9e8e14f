r"""Where the SAE train step's device time goes: the step timed, then traced with the JAX
profiler, its device kernels summed per step (JSON lines: one summary, then the kernels by
time). For a GPU session, where a launch-bound step (many small kernels) and a compute-bound one
(a few large ones) call for different fixes.

  python experiments/benchmarks/profile_step.py                          # default shape
  python experiments/benchmarks/profile_step.py --d_in=2048 --d_sae=32768 --batch=32768 \
      --compute_dtype=bfloat16 --kernels=pallas --dead_fraction=0.25

The summary line: ``step_ms`` (mean wall time per step, blocking on each), ``busy_ms`` (device
kernel time per step, streams summed), ``kernels`` (launches per step). On the CPU the "device"
is XLA's own threads (the op events of the host trace).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

from absl import app, flags
from timing import call_seconds, dead_marker

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 512, "activation width D")
flags.DEFINE_integer("d_sae", 8192, "latents M")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_integer("batch", 4096, "tokens per step N")
flags.DEFINE_string("kernels", "xla", "TrainConfig.kernels")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "matmul input dtype")
flags.DEFINE_float("dead_fraction", 0.0, "share of latents kept dead (AuxK active)")
flags.DEFINE_integer("steps", 20, "timed steps")
flags.DEFINE_integer("traced", 5, "traced steps (0: no trace)")
flags.DEFINE_integer("top", 25, "kernels listed")
flags.DEFINE_string("tag", "", "a label copied into every line (e.g. the XLA flags tried)")


def device_kernels(trace_dir: str, platform: str) -> collections.Counter:
  """(kernel name -> [count, microseconds]) over the device processes of a perfetto trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  want = "GPU" if platform == "gpu" else ("TPU" if platform == "tpu" else "/host:CPU")
  pids = {p for p, n in procs.items() if want in n}
  out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e:
      out[e["name"]][0] += 1
      out[e["name"]][1] += float(e["dur"])
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  import sae_jax as sj
  from sae_jax.train import init_train_state, make_train_step

  d, m, n = FLAGS.d_in, FLAGS.d_sae, FLAGS.batch
  x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
  cfg = sj.SAEConfig(d_in=d, d_sae=m, k=FLAGS.k, compute_dtype=FLAGS.compute_dtype)
  tcfg = sj.TrainConfig(batch_size=n, kernels=FLAGS.kernels)
  mesh = sj.make_mesh(devices=jax.devices()[:1])
  box = [init_train_state(cfg, tcfg, mesh, x)]
  step = make_train_step(cfg, tcfg, mesh)
  mark = dead_marker(m, FLAGS.dead_fraction, tcfg.dead_tokens)

  def run():
    box[0], metrics = step(mark(box[0]) if FLAGS.dead_fraction else box[0], x)
    return metrics["loss"]

  step_ms = sum(call_seconds(run, FLAGS.steps)) / FLAGS.steps * 1e3
  dev = jax.devices()[0]
  common = {"tag": FLAGS.tag, "d": d, "m": m, "k": FLAGS.k, "n": n, "kernels": FLAGS.kernels,
            "compute_dtype": FLAGS.compute_dtype, "dead_fraction": FLAGS.dead_fraction,
            "backend": dev.platform, "device": dev.device_kind, "jax": jax.__version__}
  if not FLAGS.traced:
    print(json.dumps({"name": "profile_step", **common, "step_ms": round(step_ms, 4)}))
    return
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(FLAGS.traced):
        run()
    ks = device_kernels(tmp, dev.platform)
  per = FLAGS.traced
  busy = sum(v[1] for v in ks.values()) / per / 1e3
  print(json.dumps({"name": "profile_step", **common, "step_ms": round(step_ms, 4),
                    "busy_ms": round(busy, 4),
                    "kernels": round(sum(v[0] for v in ks.values()) / per, 1)}))
  for name, (count, us) in sorted(ks.items(), key=lambda kv: -kv[1][1])[:FLAGS.top]:
    print(json.dumps({"name": "kernel", "tag": FLAGS.tag, "kernel": name[:120],
                      "per_step": round(count / per, 2), "ms_per_step": round(us / per / 1e3, 4),
                      "share_of_busy": round(us / per / 1e3 / max(busy, 1e-9), 4)}))


if __name__ == "__main__":
  app.run(main)
