"""Compile the previous global-gather mix (jnp.take of the round by a global index) for v5e:4x4
at the paper's round shape, beside the exchange, and print both programs' per-chip memory."""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sae_jax import sharding
from sae_jax.config import MeshConfig
from sae_jax.data import exchange
from sae_jax.planning.chips import tpu_devices
devs = tpu_devices("v5e:4x4")
mesh = sharding.make_mesh(MeshConfig(data=16, model=1), devs)
b, t, d, bb, size = 64, 65, 2048, 64, 32768
cap = bb * b * t
rows = lambda shape, dt, axes: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.sharding_for_shape(mesh, axes, shape))
steps = [{"h": rows((b, t, d), jnp.bfloat16, ("batch", "length", "embed"))} for _ in range(bb)]
carry = {"h": rows((size, d), jnp.float32, ("batch", "embed"))}
def old_mix(carry, steps, index):
  out = {}
  for h, c in carry.items():
    r = jnp.concatenate([s[h].reshape(-1, s[h].shape[-1]) for s in steps])
    out[h] = jnp.concatenate([c, jnp.take(r.astype(jnp.float32), index, axis=0)])
  return out
pool = sharding.sharding_for_shape(mesh, ("batch", "embed"), (size + cap, d))
idx = jax.ShapeDtypeStruct((cap,), jnp.int32, sharding=NamedSharding(mesh, P()))
old = jax.jit(old_mix, out_shardings={"h": pool}).lower(carry, steps, idx).compile()
lay = exchange.layout(16, size, cap, b * t, t, True)
m = exchange.expected_width(lay, bb * b * (t - 1))
new = exchange.mix_program(mesh, lay, m).lower(
    carry, steps, jax.ShapeDtypeStruct((16, 16 * m), jnp.int32, sharding=NamedSharding(mesh, P("data"))),
    jax.ShapeDtypeStruct((16, lay.slots * lay.per), jnp.int32, sharding=NamedSharding(mesh, P("data")))).compile()
for name, c in (("global_gather_mix", old), ("exchange_mix", new)):
  mem = c.memory_analysis()
  txt = c.as_text()
  print(json.dumps({"name": name, "topology": "v5e:4x4", "mesh": {"data": 16, "model": 1},
                    "round_rows": cap, "d": d, "temp_bytes_per_chip": mem.temp_size_in_bytes,
                    "output_bytes_per_chip": mem.output_size_in_bytes,
                    "argument_bytes_per_chip": mem.argument_size_in_bytes,
                    "all_to_all": txt.count("all-to-all("), "all_gather": txt.count("all-gather("),
                    "collective_permute": txt.count("collective-permute(")}), flush=True)
