"""Costs of a jitted function read from its jaxpr (every loop counted in full) and from its
compiled HLO (collectives).

XLA's ``cost_analysis()`` counts a while loop's body once, and the SAE step's row-chunked encode
and sparse backward are loops, so FLOPs are counted here from the jaxpr, where each scan carries
its length. Counting follows XLA's conventions (``HloCostAnalysis``): a dot is 2*M*N*K, an
elementwise op one FLOP per output element, a reduction one per input element, transcendentals
none. Bytes accessed inside loops are what XLA's count misses: the HBM traffic of each loop
body's heavy ops (dots, gathers, scatters, reductions; elementwise ops are taken as fused into
them) times the trips XLA did not count.

Per chip: a ``shard_map`` body runs on every device at its local shapes; outside one, an op's
work is divided by how many shards it is split into, propagated from the inputs' shardings (a dot
or gather of operands split over different mesh axes is split over both, any other op as its
most split operand). That is how GSPMD partitions the program at best: where it replicates
work instead, XLA's own count of a loop-free function (reported beside) is the higher one.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from jax._src import core
from jax._src.interpreters import partial_eval as pe

ELEMENTWISE = frozenset(
    "add sub mul div rem max min neg abs sign floor ceil round select_n and or not xor eq ne "
    "lt le gt ge convert_element_type integer_pow square clamp is_finite nextafter "
    "shift_left shift_right_logical shift_right_arithmetic add_any copy copy_p".split())
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin "
    "cumsum cummax cummin cumprod cumlogsumexp top_k".split())
GATHERS = frozenset("gather dynamic_slice".split())
SCATTERS = frozenset("scatter scatter-add scatter_add scatter_mul scatter_min scatter_max "
                     "dynamic_update_slice".split())
# Ops whose result combines operands sharded over different mesh axes.
_PRODUCT_SHARDED = frozenset("dot_general gather conv_general_dilated".split())


@dataclasses.dataclass
class Costs:
  """Per-chip FLOPs, the HBM bytes of loop trips XLA does not count, and while loops whose
  trip count is unknown (counted once)."""

  flops: float = 0.0
  extra_loop_bytes: float = 0.0
  unbounded_loops: int = 0

  def add(self, other: "Costs") -> None:
    self.flops += other.flops
    self.extra_loop_bytes += other.extra_loop_bytes
    self.unbounded_loops += other.unbounded_loops


def _size(aval) -> int:
  return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def _nbytes(aval) -> int:
  return _size(aval) * np.dtype(aval.dtype).itemsize if hasattr(aval, "dtype") else 0


def eqn_flops(eqn) -> float:
  """FLOPs of one primitive (no sub-jaxprs), global shapes, XLA's conventions."""
  name = eqn.primitive.name
  ins = [v.aval for v in eqn.invars]
  out = eqn.outvars[0].aval if eqn.outvars else None
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    k = int(np.prod([ins[0].shape[d] for d in lhs_contract], dtype=np.int64))
    return 2.0 * _size(out) * k
  if name == "conv_general_dilated":
    rhs = ins[1]
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * _size(out) * _size(rhs) / rhs.shape[out_feature_dim]
  if name in ELEMENTWISE:
    return float(_size(out))
  if name in REDUCTIONS:
    return float(_size(ins[0]))
  if name == "sort":
    n = ins[0].shape[eqn.params.get("dimension", -1)] if ins[0].shape else 1
    return float(_size(ins[0]) * max(1, math.ceil(math.log2(max(n, 2)))))
  if name in SCATTERS:
    return float(_size(ins[-1] if name != "dynamic_update_slice" else ins[1]))
  return 0.0


def eqn_bytes(eqn) -> float:
  """HBM bytes of a heavy op (elementwise ops are taken as fused into their neighbours)."""
  name = eqn.primitive.name
  ins = [v.aval for v in eqn.invars]
  outs = [v.aval for v in eqn.outvars]
  if name in ("dot_general", "conv_general_dilated"):
    return float(sum(map(_nbytes, ins)) + sum(map(_nbytes, outs)))
  if name in GATHERS:  # reads what it writes, plus the indices
    return float(2 * sum(map(_nbytes, outs)) + sum(map(_nbytes, ins[1:])))
  if name in SCATTERS:  # in place: reads and writes the updated rows
    upd = ins[1] if name == "dynamic_update_slice" else ins[-1]
    return float(2 * _nbytes(upd) + _nbytes(ins[1 if name != "dynamic_update_slice" else -1]))
  if name in REDUCTIONS or name == "sort":
    return float(sum(map(_nbytes, ins)) + sum(map(_nbytes, outs)))
  return 0.0


def _spec_shards(spec, mesh) -> int:
  n = 1
  for entry in tuple(spec):
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        n *= mesh.shape[axis]
  return n


def _shards_of(eqn, ins: list[int], n: int) -> tuple[int, int]:
  """(shards the op's work is split into, shards of its output): the product of the operands'
  for a dot or gather, else the most split operand's; an output has no more shards than
  elements (a reduction to a scalar is replicated)."""
  if not ins:
    return 1, 1
  work = min(n, int(np.prod(ins))) if eqn.primitive.name in _PRODUCT_SHARDED else max(ins)
  out = min(work, max(1, _size(eqn.outvars[0].aval))) if eqn.outvars else 1
  return work, out


def _sub_jaxprs(params) -> list:
  found = []
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, core.Jaxpr):
        found.append(item)
  return found


_STATED_TRIPS = re.compile(r"while_trips_([0-9.e+]+)")


def _stated_trips(eqn) -> float | None:
  """The trips a data-dependent while loop states for itself (``jax.named_scope(
  "while_trips_N")`` around it: an average bound, e.g. the block-wise update's windows), or
  None."""
  m = _STATED_TRIPS.search(str(eqn.source_info.name_stack))
  return float(m.group(1)) if m else None


def _walk(jaxpr, shards_in, n: int, local: bool, mult: float, acc: Costs) -> list[int]:
  """Accumulate per-chip costs of ``jaxpr`` run ``mult`` times; returns its outputs' shards."""
  env = dict(zip(jaxpr.invars, shards_in))
  get = lambda a: 1 if isinstance(a, core.Literal) else env.get(a, 1)
  for eqn in jaxpr.eqns:
    ins = [get(a) for a in eqn.invars]
    name = eqn.primitive.name
    if name == "shard_map":
      inner = eqn.params["jaxpr"]
      _walk(inner, [1] * len(inner.invars), n, True, mult, acc)
      outs = [_spec_shards(s, eqn.params["mesh"]) for s in eqn.params["out_specs"]]
    elif name == "scan":
      body = eqn.params["jaxpr"].jaxpr
      outs = _walk(body, ins, n, local, mult * eqn.params["length"], acc)
    elif name == "while":
      trips = _stated_trips(eqn)
      acc.unbounded_loops += trips is None
      body = eqn.params["body_jaxpr"].jaxpr  # operands: cond consts, body consts, carry
      outs = _walk(body, ins[eqn.params["cond_nconsts"]:], n, local, mult * (trips or 1), acc)
    elif name == "cond":  # the costliest branch (platform_dependent: the non-CPU one)
      best, outs = Costs(), [max(ins[1:] or [1])] * len(eqn.outvars)
      for branch in eqn.params["branches"]:
        c = Costs()
        got = _walk(branch.jaxpr, ins[1:], n, local, mult, c)
        if c.flops >= best.flops:
          best, outs = c, got
      acc.add(best)
    elif _sub_jaxprs(eqn.params) and name not in SCATTERS:
      # jit, custom_jvp/vjp calls, remat, closed_call (a scatter's sub-jaxpr is its combiner)
      sub = _sub_jaxprs(eqn.params)[0]
      outs = _walk(sub, ins if len(ins) == len(sub.invars) else [max(ins or [1])] *
                   len(sub.invars), n, local, mult, acc)
    else:
      work, shards = (1, 1) if local else _shards_of(eqn, ins, n)
      acc.flops += mult * eqn_flops(eqn) / work
      acc.extra_loop_bytes += (mult - 1) * eqn_bytes(eqn) / work
      outs = [shards] * len(eqn.outvars)
    env.update(zip(eqn.outvars, list(outs) + [1] * (len(eqn.outvars) - len(outs))))
  return [get(v) for v in jaxpr.outvars]


def jaxpr_costs(closed: core.ClosedJaxpr, in_shards: list[int], n_devices: int) -> Costs:
  """Per-chip costs of a function's jaxpr (``jax.make_jaxpr``), dead code removed first.

  Args:
    closed: the jaxpr. in_shards: how many shards each flat input is split into.
    n_devices: devices the program runs on.
  """
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars),
                          instantiate=True)
  acc = Costs()
  _walk(jaxpr, list(in_shards), n_devices, False, 1.0, acc)
  return acc


# --------------------------------------------------------------------------------------------
# Collectives in the compiled HLO.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|"
    r"collective-permute|all-to-all|collective-broadcast)(-start)?\(")


def _array_bytes(shape_text: str) -> list[int]:
  return [_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x], dtype=np.int64))
          for d, dims in _ARRAY.findall(shape_text)]


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*condition=%([\w.\-]+), body=%([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)|"
                    r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r"known_trip_count\D+(\d+)")
_LT_CONSTANT = re.compile(r"constant\((\d+)\)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """HLO text -> ({computation name: its instruction lines}, the entry's name)."""
  comps: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _trips(line: str, cond: list[str]) -> int:
  """A while loop's trip count: XLA's known_trip_count, else the bound of a scan's
  ``i < N`` condition (loops from lax.scan / fori_loop count from 0 by 1), else 1."""
  m = _TRIPS.search(line)
  if m:
    return int(m.group(1))
  if any("direction=LT" in c for c in cond):
    bounds = [int(x) for c in cond for x in _LT_CONSTANT.findall(c)]
    if len(bounds) == 1:
      return bounds[0]
  return 1


def _multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry (while bodies: x trips)."""
  mult = {entry: 1}
  order = [entry]
  for name in order:  # callers before callees: HLO call graphs are acyclic
    for line in comps.get(name, ()):
      callees = []
      w = _WHILE.search(line)
      if w:
        callees.append((w.group(2), _trips(line, comps.get(w.group(1), []))))
      for single, many in _CALLS.findall(line):
        names = [single] if single else [n.strip().lstrip("%") for n in many.split(",")]
        callees += [(n, 1) for n in names if n]
      for callee, times in callees:
        if callee not in mult:
          order.append(callee)
        mult[callee] = mult.get(callee, 0) + mult[name] * times
  return mult


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives one call of the compiled HLO runs (result
  bytes per device; an async start's result holds its input too, so only its largest array
  counts; a collective inside a loop counts once per trip)."""
  comps, entry = _computations(hlo_text)
  mult = _multiplicities(comps, entry) if entry else {}
  out: dict[str, dict[str, int]] = {}
  for name, lines in comps.items():
    times = mult.get(name, 1)
    for line in lines:
      m = _COLLECTIVE.match(line)
      if not m:
        continue
      sizes = _array_bytes(m.group(1))
      moved = (max(sizes, default=0) if m.group(3) and m.group(2) != "all-reduce"
               else sum(sizes))
      entry_ = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
      entry_["count"] += times
      entry_["bytes"] += int(moved) * times
  return out


def collective_seconds(collectives: dict, link_bw: float) -> float:
  """Time to move the collectives' bytes over one chip's links (an all-reduce moves its bytes
  twice: reduce-scatter then all-gather)."""
  return sum(v["bytes"] * (2 if k == "all-reduce" else 1)
             for k, v in collectives.items()) / link_bw
