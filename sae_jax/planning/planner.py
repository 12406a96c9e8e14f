"""Plan a trace on a TPU slice (or estimate it on GPUs) before renting one.

The trace's three jitted functions are built from shapes alone (the model's config, abstract
parameters, the SAE state via ``jax.eval_shape``) and compiled for the topology's devices on
this host: the truncated forward at the config's hook and batch, the SAE train step on the mesh,
and the spliced evaluation (clean, SAE-spliced and ablated logits of one batch). Each report
gives per-chip FLOPs (every loop counted in full, :mod:`sae_jax.planning.costs`), bytes
accessed, the compiled memory (arguments, outputs, temporaries against the chip's HBM), the
collectives and a roofline time per step; the ``trace`` report projects the whole study.

The roofline (max of compute, HBM and interconnect time at the published peaks) is a lower
bound: real steps are slower by the kernels' efficiency, which only a measurement tells.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_jax import evals, sharding
from sae_jax.config import MeshConfig
from sae_jax.data import exchange
from sae_jax.errors import ConfigError
from sae_jax.models import base
from sae_jax.models.hf import abstract_model
from sae_jax.models.hooks import parse_hook
from sae_jax.planning import costs
from sae_jax.planning.chips import USABLE_HBM, Target, resolve_target
from sae_jax.planning.study import check_hooks, model_shapes, study_counts
from sae_jax.saes import registry
from sae_jax.trace import sae_config_for
from sae_jax.trace_config import TraceConfig
from sae_jax.train.state import _init_state
from sae_jax.train.step import make_train_step

FUNCTIONS = ("forward", "mix", "sae_step", "eval")


@dataclasses.dataclass(frozen=True)
class Built:
  """A jitted function with abstract (sharded) arguments and its tokens per call."""

  name: str
  fn: Callable
  args: tuple
  tokens: int


def _abstract(shape, dtype, mesh: Mesh, axes) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                              sharding=sharding.sharding_for_shape(mesh, axes, shape))


def build_functions(cfg: TraceConfig, mesh: Mesh, family, mc) -> list[Built]:
  """The trace's forward, SAE step and evaluation, with abstract arguments on ``mesh``."""
  dtype = jnp.dtype(cfg.extract.dtype)
  graphdef, params = abstract_model(mc, cfg.extract.dtype, mesh)
  b, t = cfg.data.batch_size, cfg.data.ctx_len
  ids = _abstract((b, t), jnp.int32, mesh, ("batch", "length"))
  capture = tuple(parse_hook(h, mc.n_layers) for h in cfg.hooks)

  def forward(p, i, m):
    return base.forward(graphdef, p, i, m, capture, (), False, dtype)[0]

  sae_cfg = sae_config_for(cfg, mc.d_model)
  registry.check(sae_cfg)
  step = make_train_step(sae_cfg, cfg.train, mesh)
  state = jax.eval_shape(lambda: _init_state(sae_cfg, cfg.train, None, jax.random.key(0)))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       step.state_shardings)
  x = jax.ShapeDtypeStruct((cfg.train.batch_size, sae_cfg.d_in), jnp.float32,
                           sharding=step.x_sharding)
  hook = capture[0]
  splice = evals.SpliceReconstruct(sae_cfg)

  def evaluate(p, sae_state, i, m):
    # One of the evaluation's three forwards per batch: the one with the SAE spliced in (the
    # clean and the ablated ones cost no more; the projection counts three of these).
    logits = base.forward(graphdef, p, i, m, (), ((hook, splice),), True, dtype,
                          (sae_state,))[1]
    return evals.next_token_nll(logits, i, m)[:2]

  sae_state = {"params": state.params, "buffers": state.buffers}
  rows = b * (t - 1 if mc.bos_token_id is not None else t)  # BOS rows are dropped
  # Worst case of the step: the AuxK columns it compiles once latents are dead.
  return [Built("forward", jax.jit(forward), (params, ids, ids), rows),
          _mix(cfg, mesh, mc.d_model, dtype, rows),
          Built("sae_step", step.jitted(step.k_aux), (state, x), cfg.train.batch_size),
          Built("eval", jax.jit(evaluate), (params, sae_state, ids, ids), b * t)]


def _mix(cfg: TraceConfig, mesh: Mesh, d: int, dtype, rows: int) -> Built:
  """The on-device mixing buffer's exchange for one round of ``buffer_batches`` forwards (every
  hook at once), its all-to-all as wide as a uniform round needs (:mod:`sae_jax.data.exchange`)."""
  b, t, n = cfg.data.batch_size, cfg.data.ctx_len, mesh.shape["data"]
  steps_per_round = cfg.data.buffer_batches
  lay = exchange.stream_layout(n, cfg.train.batch_size, b, t, steps_per_round)
  m = exchange.expected_width(lay, steps_per_round * rows)
  row = lambda shape, dt, axes: _abstract(shape, dt, mesh, axes)
  carry = {h: row((lay.size, d), jnp.float32, ("batch", "embed")) for h in cfg.hooks}
  steps = [{h: row((b, t, d), dtype, ("batch", "length", "embed")) for h in cfg.hooks}
           for _ in range(steps_per_round)]
  data = NamedSharding(mesh, P("data"))
  send = jax.ShapeDtypeStruct((n, n * m), jnp.int32, sharding=data)
  gather = jax.ShapeDtypeStruct((n, lay.slots * lay.per), jnp.int32, sharding=data)
  return Built("mix", exchange.mix_program(mesh, lay, m), (carry, steps, send, gather),
               steps_per_round * rows)


def _shards(arg, mesh: Mesh) -> int:
  spec = getattr(getattr(arg, "sharding", None), "spec", P())
  return math.prod(mesh.shape[a] for e in spec if e is not None
                   for a in (e if isinstance(e, tuple) else (e,)))


def analyse(built: Built, mesh: Mesh, target: Target) -> dict:
  """Compile one function for the target and report its per-chip costs."""
  traced = built.fn.trace(*built.args)
  compiled = traced.lower().compile()
  mem = compiled.memory_analysis()
  xla = compiled.cost_analysis() or {}
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  counted = costs.jaxpr_costs(traced.jaxpr,
                              [_shards(a, mesh) for a in jax.tree.leaves(built.args)],
                              mesh.size)
  collectives = costs.hlo_collectives(compiled.as_text())
  chip = target.per_device
  bytes_accessed = float(xla.get("bytes accessed", 0.0)) + counted.extra_loop_bytes
  hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
         + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  times = {"compute_s": counted.flops / chip.bf16_flops, "memory_s": bytes_accessed / chip.hbm_bw,
           "collective_s": costs.collective_seconds(collectives, chip.link_bw)}
  report = {
      "name": built.name, "topology": target.name, "mesh": dict(mesh.shape),
      "tokens_per_step": built.tokens, "flops_per_chip": counted.flops,
      "xla_flops_per_chip": float(xla.get("flops", 0.0)),
      "bytes_accessed_per_chip": bytes_accessed,
      "argument_bytes_per_chip": mem.argument_size_in_bytes,
      "output_bytes_per_chip": mem.output_size_in_bytes,
      "alias_bytes_per_chip": mem.alias_size_in_bytes,
      "temp_bytes_per_chip": mem.temp_size_in_bytes, "hbm_bytes_per_chip": hbm,
      "hbm_capacity_per_chip": chip.hbm_bytes, "fits": hbm <= USABLE_HBM * chip.hbm_bytes,
      "collectives": collectives, **times, "roofline_step_s": max(times.values()),
      "bound": max(times, key=times.get)[:-2]}
  if counted.unbounded_loops:
    report["while_loops_counted_once"] = counted.unbounded_loops
  if target.estimate:
    report["estimate"] = True
  return report


def mesh_config(text: str | None) -> MeshConfig | None:
  """``"data,model"`` (e.g. ``"4,4"``; -1: the rest) -> MeshConfig; None stays None."""
  if not text:
    return None
  parts = text.split(",")
  try:
    data, model = (int(p) for p in parts)
  except ValueError:
    raise ConfigError(f"mesh={text!r}; expected two integers 'data,model' (e.g. 4,4)") from None
  return MeshConfig(data, model)


def _meshes(n: int) -> list[tuple[int, int]]:
  """(data, model) layouts of n devices, fewest latent shards first."""
  return [(n // m, m) for m in range(1, n + 1) if n % m == 0]


def plan(cfg: TraceConfig, topology: str, mesh: MeshConfig | None = None,
         model_config: str | None = None, search: bool = True) -> list[dict]:
  """Per-function reports (``forward``, ``sae_step``, ``eval``), then the ``trace`` report.

  Args:
    cfg: the trace. topology: ``v5e:4x4``-style TPU slice or ``h100:8``-style GPU estimate.
    mesh: the (data, model) layout (default: every device on "data").
    model_config: a config.json for a model that is neither local, toy nor published.
    search: when something does not fit, compile other layouts and name one that fits.
  """
  target = resolve_target(topology)
  family, mc = model_shapes(cfg, model_config)
  check_hooks(cfg, mc)
  mcfg = mesh or MeshConfig()
  reports = _plan_on(cfg, target, sharding.make_mesh(mcfg, target.devices), family, mc)
  trace = project(cfg, target, reports)
  if not trace["fits"] and search:
    trace["advice"] = _advice(cfg, target, family, mc, reports)
  return reports + [trace]


def _plan_on(cfg, target, mesh, family, mc) -> list[dict]:
  return [analyse(b, mesh, target) for b in build_functions(cfg, mesh, family, mc)]


def project(cfg: TraceConfig, target: Target, reports: list[dict]) -> dict:
  """The whole study: steps of each function, roofline hours and chip-hours, and whether the
  model, the SAE train state and the largest step's working memory fit a chip together."""
  by = {r["name"]: r for r in reports}
  counts = study_counts(cfg, by["forward"]["tokens_per_step"])
  seconds = sum(counts.steps(n) * by[n]["roofline_step_s"] for n in FUNCTIONS)
  step = by["sae_step"]
  # Resident at once: the model's weights (forward arguments) and the SAE state (the step's
  # arguments, updated in place); on top, the working memory of whichever function runs.
  # The mixing buffer's pool stays while the round's SAE steps read it; the round's forward
  # outputs (the mix's arguments) exist until it is built.
  resident = by["forward"]["argument_bytes_per_chip"] + step["argument_bytes_per_chip"]
  mix = by["mix"]
  working = max(by["forward"]["temp_bytes_per_chip"] + by["forward"]["output_bytes_per_chip"],
                mix["argument_bytes_per_chip"] + mix["temp_bytes_per_chip"]
                + mix["output_bytes_per_chip"],
                step["temp_bytes_per_chip"] + step["output_bytes_per_chip"]
                - step["alias_bytes_per_chip"] + mix["output_bytes_per_chip"],
                by["eval"]["hbm_bytes_per_chip"] - by["forward"]["argument_bytes_per_chip"])
  peak = resident + working
  capacity = target.per_device.hbm_bytes
  out = {"name": "trace", "topology": target.name, "chip": target.chip.name,
         "chips": target.chips, "devices": len(target.devices), "mesh": step["mesh"],
         "checkpoints": counts.checkpoints, "hooks": counts.hooks, "saes": counts.saes,
         "tokens": counts.tokens_per_sae * counts.saes,
         "tokens_per_sae": counts.tokens_per_sae, "forward_steps": counts.forward_steps,
         "sae_steps": counts.sae_steps, "eval_steps": counts.eval_steps,
         "hbm_bytes_per_chip": peak, "hbm_capacity_per_chip": capacity,
         "fits": peak <= USABLE_HBM * capacity and all(r["fits"] for r in reports),
         "hours": seconds / 3600, "chip_hours": seconds / 3600 * target.chips,
         "hours_by_function": {n: counts.steps(n) * by[n]["roofline_step_s"] / 3600
                               for n in FUNCTIONS}}
  if target.estimate:
    out["estimate"] = True
  return out


def _advice(cfg, target, family, mc, reports) -> str:
  """One line: what does not fit, by how much, and a layout that fits (or that none does)."""
  worst = max(reports, key=lambda r: r["hbm_bytes_per_chip"])
  cap = USABLE_HBM * target.per_device.hbm_bytes
  head = (f"does not fit: {worst['name']} needs {worst['hbm_bytes_per_chip'] / 2**30:.2f} GiB "
          f"per chip on mesh {worst['mesh']}, {cap / 2**30:.2f} GiB usable")
  current = tuple(worst["mesh"].values())
  for layout in _meshes(len(target.devices)):
    if layout == current:
      continue
    mesh = sharding.make_mesh(MeshConfig(*layout), target.devices)
    try:
      trial = _plan_on(cfg, target, mesh, family, mc)
    except Exception:  # a layout the shapes do not divide: not a candidate
      continue
    if project(cfg, target, trial)["fits"]:
      return head + f"; --mesh={layout[0]},{layout[1]} fits"
  return head + "; no (data, model) layout of these devices fits: use more or larger chips"
