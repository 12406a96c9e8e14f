r"""SAE train-step throughput against the bare encoder matmul (and the PyTorch peers).

Prints one JSON object per line: ``name``, ``tokens_per_s``, and for steps the ratio to the
encoder matmul ``relu(x @ W_enc)`` measured in the same run. With ``--peer_python`` it also
runs ``peer_sae_step.py`` (beside this file: sparsify, SAELens) in that interpreter at the same
shape and reports our step's speed-up over each, from the mean seconds per step on both sides
(the peer harness reports means; ``step_s`` is our lower quartile, ``step_mean_s`` our mean).

  python experiments/benchmarks/sae_step.py                       # d_in=512 d_sae=8192 k=32
  python experiments/benchmarks/sae_step.py --paper_shape         # (2048, 32768, 32), scaled
  python experiments/benchmarks/sae_step.py --peer_python=$HOME/peers-venv/bin/python
  python experiments/benchmarks/sae_step.py --kernels=xla,pallas   # both sparse-kernel paths
"""

from __future__ import annotations

import json
import os
import subprocess

from absl import app, flags
from timing import call_seconds, dead_marker, lower_quartile, lower_quartile_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 512, "activation width D")
flags.DEFINE_integer("d_sae", 8192, "latents M")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_integer("batch", 4096, "tokens per step N")
flags.DEFINE_bool("paper_shape", False, "also time the paper's shape (2048, 32768, k=32)")
flags.DEFINE_bool("default_shape", True, "time the --d_in/--d_sae/--k/--batch shape")
flags.DEFINE_integer("accelerator_chunk_mb", None,
                     "on GPU/TPU, pre-activation MB per encoder chunk (default: the library's "
                     "kernels.topk.CHUNK_BYTES)")
flags.DEFINE_integer("paper_batch", 4096,
                     "tokens per step at the paper's shape (the paper used 32768; scaled to "
                     "what a small machine holds)")
flags.DEFINE_list("architectures", ["topk"], "architectures to time")
flags.DEFINE_float("dead_fraction", 0.25,
                   "also time a step with this share of latents dead (AuxK active), as the "
                   "peer harness does; 0 to skip")
flags.DEFINE_integer("steps", 10, "timed steps (after warm-up)")
flags.DEFINE_list("kernels", ["xla"],
                  "TrainConfig.kernels to time: xla, pallas or both (steps other than the "
                  "default xla get a _pallas suffix)")
flags.DEFINE_enum("auxk_impl", "auto", ["auto", "dense", "sparse"],
                  "TrainConfig.auxk_impl of our AuxK step (auto: the library's choice)")
flags.DEFINE_string("peer_python", None, "python of a venv with eai-sparsify and sae-lens")
flags.DEFINE_string("peer_script", None,
                    "path of the peer harness (default: peer_sae_step.py beside this file, or "
                    "peer_sae_step_gpu.py when JAX runs on a GPU)")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of our step's matmul inputs and of the encoder-matmul bound (sparsify "
                  "on CUDA runs its forward under bfloat16 autocast)")


_timeit = lower_quartile_seconds


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def bench_shape(d: int, m: int, k: int, n: int, archs, dead_fraction: float, steps: int,
                tag: str, kernels=("xla",)) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import sae_jax as sj
  from sae_jax.kernels import topk
  from sae_jax.train import init_train_state, make_train_step

  device = jax.devices()[0]
  common = {"d": d, "m": m, "k": k, "n": n, "shape": tag, "backend": device.platform,
            "device": device.device_kind, "n_devices": jax.device_count(),
            "jax": jax.__version__}
  if device.platform != "cpu":
    common["accelerator_chunk_mb"] = topk.CHUNK_BYTES.get(device.platform, 0) >> 20
  key = jax.random.key(0)
  x = jax.random.normal(key, (n, d), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (d, m), jnp.float32) / np.sqrt(d)
  cdt = jnp.dtype(FLAGS.compute_dtype)
  common["compute_dtype"] = cdt.name
  matmul = jax.jit(lambda x, w: jax.nn.relu(
      jnp.dot(x.astype(cdt), w.astype(cdt), preferred_element_type=jnp.float32)))
  t_mm = _timeit(lambda: matmul(x, w), steps)
  _emit({"name": "encoder_matmul", **common, "step_s": round(t_mm, 5),
         "tokens_per_s": round(n / t_mm, 1)})
  results = {"encoder_matmul": n / t_mm}
  mesh = sj.make_mesh()
  for arch, kn in [(a, kn) for a in archs for kn in kernels]:
    cfg = sj.SAEConfig(architecture=arch, d_in=d, d_sae=m, k=k, compute_dtype=cdt.name)
    tcfg = sj.TrainConfig(batch_size=n, kernels=kn, auxk_impl=FLAGS.auxk_impl)
    variants = [("", 0.0)] + ([("_auxk", dead_fraction)] if dead_fraction > 0 and
                              cfg.architecture in ("topk", "batchtopk") else [])
    for suffix, dead in variants:
      suffix = suffix + ("" if kn == "xla" else f"_{kn}")
      state = init_train_state(cfg, tcfg, mesh, x)
      step = make_train_step(cfg, tcfg, mesh)
      box = [state]
      if dead:
        mark = dead_marker(m, dead, tcfg.dead_tokens)

        def run():
          box[0], metrics = step(mark(box[0]), x)
          return metrics["loss"]
      else:
        def run():
          box[0], metrics = step(box[0], x)
          return metrics["loss"]

      times = call_seconds(run, steps)
      t, t_mean = lower_quartile(times), sum(times) / len(times)
      name = f"sae_step_{arch}{suffix}"
      # Against the peers, the statistic their harness reports: the mean over the timed steps.
      results[name] = n / t_mean
      # The plan of a marked state (after a step, random-init "dead" latents have fired).
      plan = step.aux_plan(mark(box[0])) if dead else (0, 0)
      _emit({"name": name, **common, "kernels": kn, "dead_fraction": dead,
             "aux_columns": plan[0], "dense_auxk_capacity": plan[1], "step_s": round(t, 5),
             "step_mean_s": round(t_mean, 5), "tokens_per_s": round(n / t, 1),
             "ratio_to_encoder_matmul": round(t_mm / t, 3)})
  return results


def _ours_for(rec: dict) -> tuple[str, ...]:
  """Which of our steps a peer record compares with (same dead-latent setting)."""
  system = rec.get("system", "")
  if system.endswith("_auxk"):
    return ("sae_step_topk_auxk",)
  if "autocast" in rec:  # the GPU harness times sparsify without dead latents too
    return ("sae_step_topk",)
  return ("sae_step_topk", "sae_step_topk_auxk")  # the CPU harness: 25 % dead, always


def run_peers(d: int, m: int, k: int, n: int, ours: dict[str, float]) -> None:
  import jax
  default = "peer_sae_step_gpu.py" if jax.default_backend() == "gpu" else "peer_sae_step.py"
  script = FLAGS.peer_script or os.path.join(os.path.dirname(__file__), default)
  proc = subprocess.run([os.path.expanduser(FLAGS.peer_python), script, str(d), str(m), str(k),
                         str(n)], capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    rec["name"] = "peer_" + rec.get("system", "unknown")
    if "tokens_per_s" in rec:
      for ours_name in _ours_for(rec):
        if ours_name in ours:
          rec[f"{ours_name}_speedup"] = round(ours[ours_name] / rec["tokens_per_s"], 2)
    _emit(rec)
  if proc.returncode:
    _emit({"name": "peer_error", "returncode": proc.returncode, "stderr": proc.stderr[-500:]})


def main(argv):
  del argv
  if FLAGS.accelerator_chunk_mb:
    from sae_jax.kernels import topk
    topk.CHUNK_BYTES.update(gpu=FLAGS.accelerator_chunk_mb << 20,
                            tpu=FLAGS.accelerator_chunk_mb << 20)
  if FLAGS.default_shape:
    ours = bench_shape(FLAGS.d_in, FLAGS.d_sae, FLAGS.k, FLAGS.batch, FLAGS.architectures,
                       FLAGS.dead_fraction, FLAGS.steps, "default", FLAGS.kernels)
    if FLAGS.peer_python:
      run_peers(FLAGS.d_in, FLAGS.d_sae, FLAGS.k, FLAGS.batch, ours)
  if FLAGS.paper_shape:
    paper = bench_shape(2048, 32768, 32, FLAGS.paper_batch, ["topk"], FLAGS.dead_fraction,
                        max(3, FLAGS.steps // 3), "paper_scaled", FLAGS.kernels)
    if FLAGS.peer_python:
      run_peers(2048, 32768, 32, FLAGS.paper_batch, paper)


if __name__ == "__main__":
  app.run(main)
