r"""The CPU FFI kernels against XLA's forms of the same ops, in one process (JSON lines).

Row operations (``kernels/rows.py``: gather_sum, gather_dot, scatter_rows) with the FFI kernels
of ``cpu_rows`` and with the scan (``SAE_JAX_CPU_ROWS=0``), at J = k, k_aux and k + k_aux; the
AuxK selection (top-k_aux among dead latents) as the masked FFI top-k and as a masked copy
plus XLA's top-k. Rows are drawn among the dead quarter of the latents, as AuxK's are.

  python experiments/benchmarks/cpu_kernels.py     # d_in 512, d_sae 8192, k 32, k_aux 256
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from timing import lower_quartile_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 512, "activation width D")
flags.DEFINE_integer("d_sae", 8192, "latents M")
flags.DEFINE_integer("k", 32, "active latents per token")
flags.DEFINE_integer("k_aux", 256, "AuxK latents per token")
flags.DEFINE_integer("batch", 4096, "tokens N")
flags.DEFINE_integer("steps", 7, "timed calls (after two warm-up calls)")


def _row_ops(m: int):
  import jax.numpy as jnp
  from sae_jax.kernels import rows
  return {"gather_sum": lambda r, w, x, t: rows.gather_sum(r, w, t),
          "gather_dot": lambda r, w, x, t: rows.gather_dot(r, x, t),
          "scatter_rows": lambda r, w, x, t: rows.scatter_rows(r, w, x, m, jnp.float32)}


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from sae_jax.kernels import topk
  n, d, m = FLAGS.batch, FLAGS.d_in, FLAGS.d_sae
  ks = jax.random.split(jax.random.key(0), 4)
  table = jax.random.normal(ks[0], (m, d))
  x = jax.random.normal(ks[1], (n, d))
  common = {"n": n, "d": d, "m": m, "load_average": os.getloadavg()[0]}
  for j in sorted({FLAGS.k, FLAGS.k_aux, FLAGS.k + FLAGS.k_aux}):
    r = jax.random.randint(ks[2], (n, j), 0, m // 4, jnp.int32)
    w = jax.random.normal(ks[3], (n, j))
    for name, fn in _row_ops(m).items():
      args = (r, w, x, table)
      # A program takes the form chosen when it is traced (its first call): trace each under
      # its setting of the switch.
      os.environ["SAE_JAX_CPU_ROWS"] = "1"
      ffi = jax.jit(fn)
      a = ffi(*args)
      os.environ["SAE_JAX_CPU_ROWS"] = "0"
      scan = jax.jit(lambda *a, fn=fn: fn(*a))
      b = scan(*args)
      os.environ["SAE_JAX_CPU_ROWS"] = "1"
      t_ffi, t_scan = (lower_quartile_seconds(lambda f=f: f(*args), FLAGS.steps)
                       for f in (ffi, scan))
      diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      print(json.dumps({"name": name, "j": j, **common, "ffi_s": round(t_ffi, 5),
                        "scan_s": round(t_scan, 5), "speedup": round(t_scan / t_ffi, 2),
                        "max_rel_diff": diff}), flush=True)
  pre = jax.random.normal(ks[1], (n, m))
  dead = jnp.arange(m) < m // 4  # as the step benchmark marks them: the first quarter
  fused = jax.jit(lambda p, dd: topk.masked_top_k(p, dd, FLAGS.k_aux))
  copied = jax.jit(lambda p, dd: topk.local_top_k(jnp.where(dd[None], p, -jnp.inf), FLAGS.k_aux))
  t_f, t_c = (lower_quartile_seconds(lambda f=f: f(pre, dead), FLAGS.steps)
              for f in (fused, copied))
  same = bool(jnp.all(fused(pre, dead)[1] == copied(pre, dead)[1]))
  print(json.dumps({"name": "auxk_top_k", "k_aux": FLAGS.k_aux, **common,
                    "masked_ffi_s": round(t_f, 5), "where_then_top_k_s": round(t_c, 5),
                    "same_indices": same}), flush=True)


if __name__ == "__main__":
  app.run(main)
