r"""Learning per token: ours vs EleutherAI sparsify (and SAELens where it runs).

Every system trains a TopK SAE on the same token batches, with the same schedule (the default
warm-up, and none) and the same Adam settings, over several seeds, and is scored by the same
numpy code (``quality_peer.eval_metrics``) on the same held-out tokens: FVU, dead fraction
(latents firing on no held-out token) and L0 against tokens, and the share of planted
directions recovered (a decoder row within cos 0.9) where they are known. Datasets:

  planted       d_in 64, 256 planted unit directions, 4 active per token (magnitudes 0.5-2)
  toy_early     the tiny toy model's resid_post.1 at an early checkpoint (step30)
  toy_final     the same hook at its final checkpoint
  paper_scaled  the paper's shape scaled to a small machine: d_in 256, 4096 latents, k 32,
                on planted data (1024 directions, 16 active)

and two held out from the choice of ``DATA_FIT_POWER`` (the default TopK init's encoder scale,
chosen on the four above): ``toy_mid`` (the toy model's checkpoint at a quarter of its
training) and ``planted_wide`` (d_in 128, 512 directions, 8 active, 1024 latents, k 16).

Prints JSON lines (also written to ``--workdir/quality.jsonl``), a summary line per dataset x
schedule x system, and draws ``--workdir/quality.png``. The peers run in their own venv
(``--peer_python``, default ``$SAE_JAX_PEER_PYTHON``), as the interop tests do.

  python experiments/benchmarks/quality.py --peer_python=/root/peers-venv/bin/python
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["planted", "toy_early", "toy_final", "paper_scaled", "toy_mid",
                                "planted_wide"], "datasets")
flags.DEFINE_list("schedules", ["default", "none"], "warm-up: the default's, or none")
flags.DEFINE_integer("seeds", 3, "seeds per dataset x schedule x system")
flags.DEFINE_list("peers", ["sparsify", "sae_lens"], "peer systems")
flags.DEFINE_string("peer_python", os.environ.get("SAE_JAX_PEER_PYTHON"),
                    "python of a venv with torch, eai-sparsify and sae-lens")
flags.DEFINE_string("workdir", os.path.expanduser("~/.cache/sae_jax/quality"),
                    "outputs, data and the toy model cache")
flags.DEFINE_string("toy_dir", None, "a trained tiny toy model (default: trained into workdir)")
flags.DEFINE_float("scale", 1.0, "multiply every dataset's steps by this")
flags.DEFINE_string("encoder_init", None, "ours' encoder_init (default: TrainConfig's)")
flags.DEFINE_integer("geometric_median_iters", None,
                     "ours' b_dec initialisation: Weiszfeld iterations from the first batch's "
                     "mean (0: the mean, as sparsify's trainer; default: TrainConfig's)")
flags.DEFINE_integer("dead_tokens", None,
                     "AuxK's dead window in tokens, for every system (default: TrainConfig's, 10M, "
                     "which these short runs never reach)")
flags.DEFINE_integer("points", 8, "evaluations per run (plus the final one)")
flags.DEFINE_bool("ours", True, "train ours too (--noours: the peers only, e.g. SAELens later)")
flags.DEFINE_string("replot", None, "only redraw the PNG (and the summary) from this JSONL")
flags.DEFINE_integer("eval_tokens", 65536,
                     "held-out tokens (FVU, and dead = firing on none of them; the first 4,096 "
                     "give dead_fraction_4096, the window of rounds 6-8)")

# name: (d_sae, k, batch, steps, lr)
SHAPES = {"planted": (512, 8, 1024, 400, 1e-3), "toy_early": (512, 8, 1024, 300, 1e-3),
          "toy_final": (512, 8, 1024, 300, 1e-3), "paper_scaled": (4096, 32, 512, 120, 5e-4),
          "toy_mid": (512, 8, 1024, 300, 1e-3), "planted_wide": (1024, 16, 1024, 300, 1e-3)}


def planted(seed: int, n: int, d: int, p: int, active: int, noise: float = 0.01):
  """n tokens, each a sum of ``active`` of ``p`` random unit directions (magnitudes 0.5-2)."""
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((p, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  idx = np.argpartition(rng.random((n, p)), active, axis=1)[:, :active]
  mags = rng.uniform(0.5, 2.0, (n, active))
  x = np.einsum("na,nad->nd", mags, dirs[idx]) + noise * rng.standard_normal((n, d))
  return x.astype(np.float32), dirs.astype(np.float32)


def toy_rows(toy_dir: Path, revision: str, n: int) -> np.ndarray:
  """n rows of the toy model's resid_post.1 at ``revision`` (shuffled, fixed order)."""
  import sae_jax as sj
  model = sj.load_model(str(toy_dir), revision=revision)
  rows = sj.data.hook_rows(model, sj.DataConfig(source="toy", path=str(toy_dir), batch_size=64),
                           "resid_post.1")
  got, have = [], 0
  for chunk in rows:
    got.append(np.asarray(chunk, np.float32))
    have += len(got[-1])
    if have >= n:
      break
  x = np.concatenate(got)[:n]
  if len(x) < n:
    raise RuntimeError(f"the toy data gave {len(x)} rows, {n} wanted")
  return x[np.random.default_rng(0).permutation(n)]


def toy_model(workdir: Path) -> Path:
  if FLAGS.toy_dir:
    return Path(FLAGS.toy_dir)
  out = workdir / "toy_model"
  if not (out / "world.json").exists():
    from sae_jax.toy.lm import TINY_LM, TINY_WORLD, train_toy_lm
    train_toy_lm(out, TINY_WORLD, TINY_LM)
  return out


def dataset(name: str, workdir: Path) -> Path:
  """The dataset's .npz (train, eval, planted?), built once into workdir."""
  d_sae, k, batch, steps, lr = SHAPES[name]
  steps = max(1, int(steps * FLAGS.scale))
  ev = FLAGS.eval_tokens
  path = workdir / f"{name}_{steps}_eval{ev}.npz"
  if path.exists():
    return path
  n = steps * batch + ev
  if name == "planted":
    x, dirs = planted(0, n, 64, 256, 4)
  elif name == "paper_scaled":
    x, dirs = planted(1, n, 256, 1024, 16)
  elif name == "planted_wide":
    x, dirs = planted(2, n, 128, 512, 8)
  else:
    toy = toy_model(workdir)
    revs = sorted(int(p.name[4:]) for p in toy.glob("step*"))
    mid = max(r for r in revs if r <= revs[-1] // 4)  # step100 of the tiny model's 400
    rev = {"toy_early": "step30", "toy_mid": f"step{mid}"}.get(name, f"step{revs[-1]}")
    x, dirs = toy_rows(toy, rev, n), None
  extra = {} if dirs is None else {"planted": dirs}
  np.savez(path, train=x[ev:], eval=x[:ev], **extra)
  return path


def runs(name: str) -> list[dict]:
  """Every (schedule, seed) run of a dataset, in the form both sides read."""
  import sae_jax as sj
  d_sae, k, batch, _, lr = SHAPES[name]
  o, t = sj.OptimConfig(), sj.TrainConfig()
  out = []
  for sched in FLAGS.schedules:
    warm = o.warmup_steps if sched == "default" else 0
    for seed in range(FLAGS.seeds):
      out.append({"d_sae": d_sae, "k": k, "batch_size": batch, "lr": lr, "warmup": warm,
                  "b1": o.adam_b1, "b2": o.adam_b2, "eps": o.adam_eps, "seed": seed,
                  "dead_tokens": FLAGS.dead_tokens or t.dead_tokens, "auxk_coef": t.auxk_coef,
                  "tag": {"dataset": name, "schedule": sched, "seed": seed}})
  return out


def eval_steps(steps: int) -> list[int]:
  return sorted({int(round(steps * i / FLAGS.points)) for i in range(FLAGS.points)})


def train_ours(run: dict, data, emit) -> None:
  import jax

  import sae_jax as sj
  from quality_peer import eval_metrics
  from sae_jax.train import init_train_state, make_train_step
  x, ev = data["train"], data["eval"]
  dirs = data.get("planted")
  bs, k = run["batch_size"], run["k"]
  cfg = sj.SAEConfig(d_in=x.shape[1], d_sae=run["d_sae"], k=k)
  init = {"encoder_init": FLAGS.encoder_init} if FLAGS.encoder_init else {}
  if FLAGS.geometric_median_iters is not None:
    init["geometric_median_iters"] = FLAGS.geometric_median_iters
  tcfg = sj.TrainConfig(batch_size=bs, seed=run["seed"], dead_tokens=run["dead_tokens"],
                        auxk_coef=run["auxk_coef"], **init, optim=sj.OptimConfig(
      lr=run["lr"], warmup_steps=run["warmup"], adam_b1=run["b1"], adam_b2=run["b2"],
      adam_eps=run["eps"]))
  mesh = sj.make_mesh(devices=jax.devices()[:1])
  state = init_train_state(cfg, tcfg, mesh, x[:bs])
  step = make_train_step(cfg, tcfg, mesh)
  steps = len(x) // bs

  def score():
    p = {n: np.asarray(v) for n, v in state.params.items()}
    return eval_metrics(p, ev, k, dirs)
  for i in range(steps):
    if i in run["eval_steps"]:
      emit({**run["tag"], "step": i, "tokens": i * bs, **score()})
    state, _ = step(state, x[i * bs:(i + 1) * bs])
  emit({**run["tag"], "step": steps, "tokens": steps * bs, "final": True, **score()})


def train_peers(path: Path, rs: list[dict], workdir: Path, emit) -> None:
  job = {"data": str(path), "runs": [{**r, "system": s, "tag": {**r["tag"], "system": s}}
                                     for s in FLAGS.peers for r in rs]}
  job_path = workdir / "peer_job.json"
  job_path.write_text(json.dumps(job))
  script = Path(__file__).with_name("quality_peer.py")
  proc = subprocess.Popen([FLAGS.peer_python, str(script), str(job_path)],
                          stdout=subprocess.PIPE, text=True)
  for line in proc.stdout:
    try:
      emit(json.loads(line))
    except json.JSONDecodeError:
      continue
  if proc.wait():
    emit({"dataset": path.stem, "peer_error": proc.returncode})


def summarise(records: list[dict], emit) -> list[dict]:
  """One line per dataset x schedule x system: final metrics' mean, min and max over seeds."""
  finals: dict[tuple, list[dict]] = {}
  for r in records:
    if r.get("final"):
      finals.setdefault((r["dataset"], r["schedule"], r["system"]), []).append(r)
  out = []
  for (ds, sched, system), rs in sorted(finals.items()):
    rec = {"summary": True, "dataset": ds, "schedule": sched, "system": system, "seeds": len(rs)}
    for m in ("fvu", "dead_fraction", "dead_fraction_4096", "recovered", "l0"):
      vals = [r[m] for r in rs if m in r]
      if vals:
        rec[m] = round(float(np.mean(vals)), 4)
        rec[m + "_range"] = [round(float(min(vals)), 4), round(float(max(vals)), 4)]
    out.append(rec)
    emit(rec)
  return out


def plot(records: list[dict], path: Path) -> None:
  """One row per dataset; per schedule, held-out FVU (log), dead fraction on all held-out
  tokens and on the first 4,096, against tokens (mean over seeds, one line per system)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = (("fvu", "held-out FVU"), ("dead_fraction", "dead (all held-out)"),
             ("dead_fraction_4096", "dead (first 4,096)"))
  datasets = [d for d in FLAGS.datasets if any(r.get("dataset") == d for r in records)]
  cols = [(s, m) for s in FLAGS.schedules for m in metrics]
  fig, axes = plt.subplots(len(datasets), len(cols), figsize=(2.6 * len(cols),
                           2.0 * len(datasets)), squeeze=False)
  curves: dict[tuple, dict[str, dict[int, list]]] = {}  # (dataset, schedule) -> system -> tokens
  for r in records:
    if "tokens" in r:
      curves.setdefault((r["dataset"], r["schedule"]), {}).setdefault(
          r["system"], {}).setdefault(r["tokens"], []).append(r)
  for row, ds in enumerate(datasets):
    for c, (sched, (m, label)) in enumerate(cols):
      ax = axes[row, c]
      for system, pts in sorted(curves.get((ds, sched), {}).items()):
        t = sorted(pts)
        ax.plot([x / 1e3 for x in t], [np.mean([r.get(m, np.nan) for r in pts[x]]) for x in t],
                label=system)
      if m == "fvu":
        ax.set_yscale("log")
      ax.set_title(f"{ds}, warm-up {sched}: {label}", fontsize=7)
      ax.tick_params(labelsize=6)
  for c in range(len(cols)):
    axes[-1, c].set_xlabel("thousand tokens", fontsize=7)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main(argv):
  del argv
  sys.path.insert(0, str(Path(__file__).parent))
  workdir = Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if FLAGS.replot:
    records = [json.loads(line) for line in open(FLAGS.replot) if line.startswith("{")]
    summarise([r for r in records if not r.get("summary")], lambda rec: print(json.dumps(rec)))
    plot(records, workdir / "quality.png")
    return
  records: list[dict] = []
  log = open(workdir / "quality.jsonl", "w")

  def emit(rec):
    records.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()
  for name in FLAGS.datasets:
    path = dataset(name, workdir)
    data = dict(np.load(path))
    rs = runs(name)
    steps = len(data["train"]) // SHAPES[name][2]
    for r in rs:
      r["eval_steps"] = eval_steps(steps)
    for r in rs if FLAGS.ours else []:
      train_ours({**r, "tag": {**r["tag"], "system": "ours"}}, data, emit)
    if FLAGS.peer_python:
      train_peers(path, rs, workdir, emit)
  summarise(records, emit)
  plot(records, workdir / "quality.png")
  log.close()


if __name__ == "__main__":
  app.run(main)
