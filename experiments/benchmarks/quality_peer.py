"""The peers' side of ``quality.py``: train EleutherAI sparsify's (and SAELens') TopK SAE on the
same tokens, schedule and Adam settings as ours, and score it with the same numpy metrics.

Runs in the peers' own venv (torch, eai-sparsify, sae-lens): ``python quality_peer.py JOB.json``.
The job names an ``.npz`` with ``train`` [steps * batch, d], ``eval`` [n, d] and optionally
``planted`` [p, d] unit directions, and the runs to make (system, seed, warm-up). Prints one
JSON line per evaluation point. ``eval_metrics`` (numpy only) is imported by ``quality.py`` too,
so every system is scored by the same code.
"""

from __future__ import annotations

import json
import sys

import numpy as np


# Held-out tokens behind the short-window dead count kept beside the full-set one (the window of
# rounds 6-8's tables): a latent silent on these may still fire on the whole held-out set.
SHORT_WINDOW = 4096


def eval_metrics(params: dict, x: np.ndarray, k: int, planted=None) -> dict:
  """FVU, L0, dead fraction and planted recovery of a TopK SAE given as numpy ``W_enc`` [d, m],
  ``b_enc``, ``W_dec`` [m, d], ``b_dec``, on held-out x [n, d].

  ``dead_fraction``: latents firing on none of the n tokens (sparsify's and Gao et al.'s
  definition, a window of tokens without firing, with the held-out set as the window);
  ``dead_fraction_4096``: the same on the first 4,096 tokens only, so latents rarer than about
  1/4096 count as dead there.
  """
  w_enc, b_enc = params["W_enc"].astype(np.float32), params["b_enc"].astype(np.float32)
  w_dec, b_dec = params["W_dec"].astype(np.float32), params["b_dec"].astype(np.float32)
  m = w_enc.shape[1]
  fired, fired_short = np.zeros(m, bool), np.zeros(m, bool)
  sse, l0 = 0.0, 0.0
  for s in range(0, len(x), SHORT_WINDOW):
    xb = x[s:s + SHORT_WINDOW]
    pre = np.maximum((xb - b_dec) @ w_enc + b_enc, 0.0)
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(pre, idx, 1)
    recon = np.einsum("nk,nkd->nd", vals, w_dec[idx]) + b_dec
    sse += float(((recon - xb) ** 2).sum())
    l0 += float((vals > 0).sum())
    fired[idx[vals > 0]] = True
    if s == 0:
      fired_short[:] = fired
  out = {"fvu": sse / float(((x - x.mean(0)) ** 2).sum()), "l0": l0 / len(x),
         "dead_fraction": float(1.0 - fired.mean()),
         "dead_fraction_4096": float(1.0 - fired_short.mean())}
  if planted is not None:
    unit = w_dec / np.maximum(np.linalg.norm(w_dec, axis=1, keepdims=True), 1e-12)
    out["recovered"] = float(((planted @ unit.T).max(1) > 0.9).mean())
  return out


def _lr(step: int, lr: float, warmup: int) -> float:
  """Ours exactly: lr * min(1, (step + 1) / warmup), constant after."""
  return lr * min(1.0, (step + 1) / max(warmup, 1))


def _sparsify(d, run, torch):
  from sparsify import SparseCoder, SparseCoderConfig
  torch.manual_seed(run["seed"])
  sae = SparseCoder(d, SparseCoderConfig(num_latents=run["d_sae"], k=run["k"]))

  def params():
    return {"W_enc": sae.encoder.weight.detach().numpy().T, "b_enc": sae.encoder.bias.detach().numpy(),
            "W_dec": sae.W_dec.detach().numpy(), "b_dec": sae.b_dec.detach().numpy()}

  first = [True]

  def step(x, dead):
    if first[0]:  # sparsify's trainer: b_dec starts at the first batch's mean
      sae.b_dec.data = x.mean(0)
      first[0] = False
    out = sae(x, dead_mask=dead if bool(dead.any()) else None)
    loss = out.fvu + run["auxk_coef"] * out.auxk_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    return out.latent_indices

  def after():
    sae.set_decoder_norm_to_unit_norm()
  return sae, params, step, after


def _sae_lens(d, run, torch):
  from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
  from sae_lens.saes.sae import TrainStepInput
  torch.manual_seed(run["seed"])
  sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=run["d_sae"], k=run["k"],
                                              device="cpu", dtype="float32"))

  def params():
    return {n: getattr(sae, n).detach().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}

  def step(x, dead):
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
        is_logging_step=False))
    out.loss.backward()
    return None

  def after():
    pass
  return sae, params, step, after


def train(run: dict, data, emit) -> None:
  """One peer run: the given system, seed and warm-up over every batch of ``data['train']``."""
  import torch
  torch.set_num_threads(run.get("threads", 2))
  train_x, eval_x = data["train"], data["eval"]
  planted = data["planted"] if "planted" in data else None
  n, d = train_x.shape
  bs = run["batch_size"]
  sae, params, step_fn, after = (_sparsify if run["system"] == "sparsify" else _sae_lens)(
      d, run, torch)
  opt = torch.optim.Adam(sae.parameters(), lr=run["lr"], betas=(run["b1"], run["b2"]),
                         eps=run["eps"])
  since = torch.zeros(run["d_sae"], dtype=torch.long)
  steps = n // bs
  for i in range(steps):
    if i in run["eval_steps"]:
      emit({**run["tag"], "step": i, "tokens": i * bs,
            **eval_metrics(params(), eval_x, run["k"], planted)})
    for g in opt.param_groups:
      g["lr"] = _lr(i, run["lr"], run["warmup"])
    x = torch.from_numpy(train_x[i * bs:(i + 1) * bs])
    idx = step_fn(x, since >= run["dead_tokens"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    after()
    if idx is not None:
      fired = torch.zeros(run["d_sae"], dtype=torch.bool)
      fired[idx.flatten()] = True
      since = torch.where(fired, 0, since + bs)
  emit({**run["tag"], "step": steps, "tokens": steps * bs, "final": True,
        **eval_metrics(params(), eval_x, run["k"], planted)})


def main(job_path: str) -> None:
  job = json.loads(open(job_path).read())
  data = dict(np.load(job["data"]))

  def emit(rec):
    print(json.dumps(rec), flush=True)
  for run in job["runs"]:
    try:
      train(run, data, emit)
    except Exception as e:  # report, do not hide: the caller records the error
      emit({**run["tag"], "error": repr(e)[:300]})


if __name__ == "__main__":
  main(sys.argv[1])
