r"""The sparse TopK kernels: the XLA path against the Pallas kernels (``kernels="pallas"``).

Prints one JSON object per line for each of ``decode_fwd``, ``decode_bwd`` (gradients to the
values and to W_dec), ``encoder_weight_grad`` (W_enc's gradient over the selected latents) and
``train_step`` (the whole TopK step from ``make_train_step``): seconds and tokens/s of each path,
the speed-up, and the largest absolute difference of the Pallas results from the XLA ones.

  python experiments/benchmarks/sparse_kernels.py            # d_in 2048, d_sae 32768, k 32, N 16384
  python experiments/benchmarks/sparse_kernels.py --small    # a tiny shape; on a CPU the Pallas
                                                      # kernels run interpreted (proof of life)
"""

from __future__ import annotations

import json

from absl import app, flags
from timing import lower_quartile_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 2048, "activation width D")
flags.DEFINE_integer("d_sae", 32768, "latents M")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_integer("batch", 16384, "tokens N")
flags.DEFINE_integer("steps", 10, "timed calls (after two warm-up calls)")
flags.DEFINE_bool("small", False, "d_in 64, d_sae 512, k 8, N 256, 2 timed calls")
flags.DEFINE_list("ops", ["decode_fwd", "decode_bwd", "encoder_weight_grad", "train_step",
                          "encoder_matmul", "encode_fwd"],
                  "what to time")


_timeit = lower_quartile_seconds


def _max_diff(a, b) -> float:
  import jax
  import jax.numpy as jnp
  diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u.astype(jnp.float32) - v)), a, b)
  return float(max(jax.tree.leaves(diffs)))


def _inputs(d: int, m: int, k: int, n: int):
  import jax
  import jax.numpy as jnp
  from sae_jax.kernels.topk import owned_rows
  ks = jax.random.split(jax.random.key(0), 5)
  idx = jax.random.randint(ks[0], (n, k), 0, m, jnp.int32)
  values = jax.nn.relu(jax.random.normal(ks[1], (n, k)))
  W_dec = jax.random.normal(ks[2], (m, d)) / jnp.sqrt(d)
  g = jax.random.normal(ks[3], (n, d))
  x = jax.random.normal(ks[4], (n, d))
  rows, _ = owned_rows(idx, m, None)
  return dict(idx=idx, values=values, W_dec=W_dec, g=g, x=x, rows=rows)


def _op_fns(op: str, t: dict, m: int):
  """{kernels: zero-argument jitted call} for one op."""
  import functools

  import jax
  import jax.numpy as jnp
  from sae_jax.kernels import rows as row_ops
  from sae_jax.kernels import sparse_decode, sparse_ops, topk, topk_encode

  if op == "decode_fwd":
    f = jax.jit(sparse_decode, static_argnums=(3, 4))
    return {kn: functools.partial(f, t["values"], t["idx"], t["W_dec"], None, kn)
            for kn in ("xla", "pallas")}
  if op == "decode_bwd":
    _, res = topk._decode_fwd(t["values"], t["idx"], t["W_dec"], None, "xla")
    f = jax.jit(lambda res, g, kn: topk._decode_bwd(None, kn, res, g)[::2], static_argnums=2)
    return {kn: functools.partial(f, res, t["g"], kn) for kn in ("xla", "pallas")}
  if op == "encoder_weight_grad":
    def grad(rows, w, x, kn):
      if kn == "xla":
        return row_ops.scatter_rows(rows, w, x, m, jnp.float32).T
      return sparse_ops.scatter_rows(rows, w, x, m).T
    f = jax.jit(grad, static_argnums=3)
    return {kn: functools.partial(f, t["rows"], t["values"], t["x"], kn)
            for kn in ("xla", "pallas")}
  if op in ("encoder_matmul", "encode_fwd"):
    # Where the step's time goes besides the sparse ops: the dense matmul, and the matmul plus
    # the top-k selection (XLA's on both paths; "pallas" is the same program here).
    d = t["x"].shape[1]
    w_enc = t["W_dec"].T
    if op == "encoder_matmul":
      f = jax.jit(lambda x, w: jax.nn.relu(x @ w))
    else:
      zeros_m, zeros_d = jnp.zeros((m,)), jnp.zeros((d,))
      f = jax.jit(lambda x, w: topk_encode(x, w, zeros_m, zeros_d, t["idx"].shape[1]).values)
    return {kn: functools.partial(f, t["x"], w_enc) for kn in ("xla", "pallas")}
  raise ValueError(f"unknown op {op!r}")


def _train_step_fns(d: int, m: int, k: int, n: int):
  import jax
  import sae_jax as sj
  from sae_jax.train import init_train_state, make_train_step
  cfg = sj.SAEConfig(d_in=d, d_sae=m, k=k)
  x = jax.random.normal(jax.random.key(5), (n, d))
  mesh = sj.make_mesh()
  fns = {}
  for kn in ("xla", "pallas"):
    tcfg = sj.TrainConfig(batch_size=n, kernels=kn)
    step = make_train_step(cfg, tcfg, mesh)
    box = [init_train_state(cfg, tcfg, mesh, x)]

    def run(step=step, box=box):
      box[0], metrics = step(box[0], x)
      return box[0].params, metrics["loss"]
    fns[kn] = run
  # The first call of each, from equal initial states, gives the compared results.
  first = {kn: jax.device_get(fn()[0]) for kn, fn in fns.items()}
  return fns, first


def main(argv):
  del argv
  import jax
  d, m, k, n, steps = FLAGS.d_in, FLAGS.d_sae, FLAGS.k, FLAGS.batch, FLAGS.steps
  if FLAGS.small:
    d, m, k, n, steps = 64, 512, 8, 256, 2
  device = jax.devices()[0]
  common = {"d_in": d, "d_sae": m, "k": k, "n": n, "backend": device.platform,
            "device": device.device_kind}
  t = _inputs(d, m, k, n)
  for op in FLAGS.ops:
    try:
      record = _bench_op(op, t, d, m, k, n, steps)
    except Exception as e:  # noqa: BLE001 (one op failing to compile must not hide the others)
      record = {"name": op, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    print(json.dumps({**record, **common}), flush=True)


def _bench_op(op: str, t: dict, d: int, m: int, k: int, n: int, steps: int) -> dict:
  if op == "train_step":
    fns, first = _train_step_fns(d, m, k, n)
    diff = _max_diff(first["pallas"], first["xla"])
  else:
    fns = _op_fns(op, t, m)
    diff = _max_diff(fns["pallas"](), fns["xla"]())
  secs = {kn: _timeit(fn, steps) for kn, fn in fns.items()}
  return {"name": op, "xla_s": round(secs["xla"], 6), "pallas_s": round(secs["pallas"], 6),
          "xla_tokens_per_s": round(n / secs["xla"], 1),
          "pallas_tokens_per_s": round(n / secs["pallas"], 1),
          "pallas_speedup": round(secs["xla"] / secs["pallas"], 3),
          "max_abs_diff_to_xla": diff}

if __name__ == "__main__":
  app.run(main)
