"""The study's answer: ``analysis/findings.json`` and the report's first section.

Per checkpoint (the trace's own SAEs, seed 0; step 0, the random model, flagged as the
control): the shares of ``en`` / ``ja`` / ``bilingual`` (the paper's rule; beside them the same
rule on the per-token truth where the world gives one) and of the paper's four granularity
classes among live features, each ``[share, lo, hi]`` with a Wilson 95 % interval; the SAE's
FVU and dead fraction; and the model-level ground truth (alignment.py), which no SAE enters:
``model_alignment`` is the translation similarity gap (a concept's centroid in one language
against its centroid in the other, minus matched pairs of different concepts of one category;
0: no alignment) with its 95 % interval, and the cross-language probe's balanced accuracy
beside it with its permutation null.

The verdicts, over the trained checkpoints (step > 0), each ``{"answer": true|false|null, ...
the numbers behind it}``:

* ``language_specific_first``: does the bilingual share rise from the first trained checkpoint
  to the last? Yes when the difference's Newcombe 95 % interval is above 0; no when it is below
  ``MIN_RISE`` (no rise of that size is plausible); otherwise undecided (null).
* ``token_level_first``: the same for the concept-level share (``concept_synonym`` +
  ``concept_semantic``).
* ``sae_follows_model``: Spearman's rank correlation, over the trained checkpoints, of the
  bilingual share with the model's cross-language alignment (``model_alignment``); yes when it is
  positive with an exact one-sided permutation p < 0.05, no when it is <= 0, else undecided;
  undecided too when the model never aligns (its interval covers 0 at every checkpoint).
"""

from __future__ import annotations

import html
import itertools
import math

import numpy as np

from sae_jax.analysis.describe import SAEFeatures
from sae_jax.analysis.granularity import GRANULARITIES
from sae_jax.analysis.tables import wilson_interval

LANGUAGES = ("en", "ja", "bilingual")
CONCEPT_LEVEL = ("concept_synonym", "concept_semantic")
MIN_RISE = 0.05  # a rise smaller than this is not the paper's finding
ALPHA = 0.05


def shares(labels: np.ndarray, names) -> tuple[dict, int]:
  """{name: [share, lo, hi]} over ``labels`` (those not "none"/"dead"), and their number."""
  labels = labels[(labels != "none") & (labels != "dead")]
  n = int(labels.size)
  out = {}
  for name in names:
    k = int((labels == name).sum())
    lo, hi = wilson_interval(k, n)
    out[name] = [k / n if n else float("nan"), lo, hi]
  return out, n


def checkpoint_entry(d: SAEFeatures, ev: dict, alignment: dict | None) -> dict:
  """One checkpoint's findings (JSON-ready)."""
  lab, live = d.labels, d.live
  lang, n_lang = shares(lab.language[live], LANGUAGES)
  gran_labels = lab.granularity_paper if lab.granularity_paper is not None else lab.granularity
  gran, n_gran = shares(gran_labels[live], GRANULARITIES)
  truth, n_truth = shares(lab.language_truth[live], LANGUAGES)
  agree = float((lab.language[live] == lab.language_truth[live]).mean()) if live.size else None
  a = alignment or {}
  trans = a.get("translation_similarity", {})
  return {"checkpoint": d.record.checkpoint, "step": d.record.step, "hook": d.record.hook,
          "control": d.record.step == 0, "n_live": int(live.size), "d_sae": d.stats.d_sae,
          "n_language_labelled": n_lang, "n_language_truth": n_truth,
          "n_granularity_labelled": n_gran,
          "language_shares": lang, "language_shares_truth": truth,
          "language_agreement_with_truth": agree, "granularity_shares": gran,
          "model_alignment": trans.get("gap"),
          "model_alignment_ci": [trans.get("lo"), trans.get("hi")] if trans else None,
          "probe_accuracy": a.get("probe_accuracy"), "probe_null": a.get("probe_null"),
          "probe_null_range": a.get("probe_null_range"), "probe_p": a.get("probe_p"),
          "synonym_similarity": a.get("synonym_similarity", {}).get("gap"),
          "model": alignment, "fvu": ev.get("fvu"), "dead_fraction": ev.get("dead_fraction"),
          "dead_fraction_eval_set": 1 - live.size / max(d.stats.d_sae, 1)}


def newcombe_difference(later: list, earlier: list, n_later: int, n_earlier: int) -> list:
  """[difference, lo, hi] of two independent shares given as [share, lo, hi] (Wilson)."""
  (p1, l1, u1), (p2, l2, u2) = later, earlier
  if not (n_later and n_earlier):
    return [float("nan")] * 3
  d = p1 - p2
  return [d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
          d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)]


def _rise(first: dict, last: dict, names: tuple[str, ...], key: str, n_key: str) -> dict:
  """The rise of the summed share of ``names`` from ``first`` to ``last`` and its answer."""
  def summed(e):
    n = e[n_key]
    k = round(sum(e[key][x][0] for x in names) * n) if n else 0
    lo, hi = wilson_interval(k, n)
    return [k / n if n else float("nan"), lo, hi]
  a, b = summed(first), summed(last)
  diff = newcombe_difference(b, a, last[n_key], first[n_key])
  answer = None if math.isnan(diff[0]) else (
      True if diff[1] > 0 else False if diff[2] < MIN_RISE else None)
  return {"answer": answer, "share_first": a, "share_last": b, "rise": diff,
          "first": first["checkpoint"], "last": last["checkpoint"], "min_rise": MIN_RISE}


def spearman(x, y) -> tuple[float, float]:
  """Spearman's rho and its exact one-sided permutation p (rho >= observed), n <= 8."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)
  rx, ry = rank(x), rank(y)
  corr = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if a.std() and b.std() else float("nan")
  rho = corr(rx, ry)
  if math.isnan(rho) or len(x) > 8:
    return rho, float("nan")
  perms = [corr(rx, ry[list(p)]) for p in itertools.permutations(range(len(y)))]
  return rho, float(np.mean([r >= rho - 1e-12 for r in perms]))


def verdicts(entries: list[dict]) -> dict:
  """The three verdicts over the trained checkpoints of one hook (see the module docstring)."""
  trained = [e for e in entries if not e["control"]]
  if len(trained) < 2:
    none = {"answer": None, "reason": "fewer than two trained checkpoints"}
    return {k: dict(none) for k in ("language_specific_first", "token_level_first",
                                    "sae_follows_model")}
  first, last = trained[0], trained[-1]
  lang = _rise(first, last, ("bilingual",), "language_shares", "n_language_labelled")
  lang["truth"] = _rise(first, last, ("bilingual",), "language_shares_truth",
                        "n_language_truth")["answer"]
  gran = _rise(first, last, CONCEPT_LEVEL, "granularity_shares", "n_granularity_labelled")
  sae = [e["language_shares"]["bilingual"][0] for e in trained]
  model = [e["model_alignment"] for e in trained]
  follows = {"answer": None, "sae_bilingual_share": sae, "model_alignment": model,
             "checkpoints": [e["checkpoint"] for e in trained]}
  cis = [e.get("model_alignment_ci") for e in trained]
  # A model whose alignment never leaves its null (every interval covers 0) has no timeline
  # for the SAE to follow: the rank correlation is then of noise, and the answer undecided.
  flat = all(ci and ci[0] is not None and ci[0] <= 0 <= ci[1] for ci in cis)
  if all(m is not None and not math.isnan(m) for m in model) and len(trained) >= 3:
    rho, p = spearman(sae, model)
    follows.update(rank_correlation=rho, p_one_sided=p, model_never_aligns=flat)
    if not math.isnan(rho) and not flat:
      follows["answer"] = True if rho > 0 and p < ALPHA else False if rho <= 0 else None
    elif flat:
      follows["reason"] = "the model's alignment interval covers 0 at every checkpoint"
    concept = [sum(e["granularity_shares"][x][0] for x in CONCEPT_LEVEL) for e in trained]
    syn = [e["synonym_similarity"] for e in trained]
    if all(s is not None for s in syn):
      follows["concept_level_vs_synonym_similarity"] = spearman(concept, syn)[0]
  else:
    follows["reason"] = "no model-level alignment (not a toy model) or under 3 checkpoints"
  return {"language_specific_first": lang, "token_level_first": gran, "sae_follows_model": follows}


def _cell(v) -> str:
  """A value as the report shows it: [share, lo, hi] as "share [lo, hi]", floats to 3 places."""
  if isinstance(v, list) and len(v) == 3 and all(isinstance(x, float) for x in v):
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if not math.isnan(v[0]) else ""
  if isinstance(v, list):
    return "[" + ", ".join(_cell(x) for x in v) + "]"
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.3f}"
  return "" if v is None else str(v)


def findings_html(findings: dict | None) -> str:
  """The report's first section: the verdicts and the per-checkpoint table."""
  if not findings:
    return ""
  items = []
  for name, v in findings["verdicts"].items():
    answer = {True: "yes", False: "no", None: "undecided"}[v.get("answer")]
    nums = ", ".join(f"{k}={_cell(x)}" for k, x in v.items() if k != "answer")
    items.append(f"<li><b>{html.escape(name)}: {answer}</b> <small>{html.escape(nums)}</small>"
                 "</li>")
  cols = (["checkpoint", "step", "n_live", "fvu", "dead_fraction", "model_alignment",
           "probe_accuracy", "probe_null", "probe_p", "synonym_similarity"])
  head = cols + ["fvu change, last 20 % of training"] + [f"lang {x}" for x in LANGUAGES] + [f"truth {x}" for x in LANGUAGES] + [
      f"gran {x}" for x in GRANULARITIES]
  rows = []
  for e in findings["checkpoints"]:
    cells = [e.get(c) for c in cols] + [
        (e.get("training_curve") or {}).get("fvu_change_last_20pct")] + [
        e["language_shares"][x] for x in LANGUAGES] + [
        e["language_shares_truth"][x] for x in LANGUAGES] + [
        e["granularity_shares"][x] for x in GRANULARITIES]
    style = ' style="color:#888"' if e["control"] else ""
    rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in cells)
                + "</tr>")
  table = ('<table class="tbl"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
  return ("<h2>Findings (findings.json)</h2><ul>" + "".join(items) + "</ul>" + table +
          "<p><small>Shares among live features: share [Wilson 95 % interval]. Grey: step 0, "
          "the random model (the control). The model's own truth, independent of any SAE: "
          "model alignment = cosine of a concept's centroids across languages minus that of "
          "different concepts of one category (0: none); probe = a concept probe trained on one "
          "language, tested on the other (balanced accuracy; null: relabelled concepts, p); "
          "synonym similarity = the same gap for two forms of one concept.</small></p>")


def flattening(curves, checkpoint: str, hook: str) -> dict:
  """How flat an SAE's training curves ended (seed 0): FVU and dead fraction at 80 % of its
  training steps and at the end, and the FVU's relative change between them."""
  if curves is None or curves.empty:
    return {}
  rows = curves[(curves.checkpoint == checkpoint) & (curves.hook == hook) & (curves.seed == 0)]
  if len(rows) < 2:
    return {}
  steps = rows.train_step.to_numpy()
  at = rows.iloc[int(np.argmin(np.abs(steps - 0.8 * steps.max())))]
  end = rows.iloc[-1]
  return {"fvu_at_80pct": float(at.fvu), "fvu_end": float(end.fvu),
          "fvu_change_last_20pct": float((end.fvu - at.fvu) / max(at.fvu, 1e-12)),
          "dead_at_80pct": float(at.dead_fraction), "dead_end": float(end.dead_fraction)}


def build_findings(described: list[SAEFeatures], evals: dict[str, dict],
                   alignment: dict[tuple[str, str], dict], curves=None) -> dict:
  """findings.json: every checkpoint's entry (seed 0, each hook) and the first hook's verdicts
  (``verdicts_by_hook`` holds every hook's). ``curves``: the training curves table (tables.py),
  for how flat FVU and dead fraction ended."""
  entries = [{**checkpoint_entry(d, evals.get(d.record.key, {}),
                                 alignment.get((d.record.checkpoint, d.record.hook))),
              "training_curve": flattening(curves, d.record.checkpoint, d.record.hook)}
             for d in described if d.record.seed == 0]
  hooks = list(dict.fromkeys(e["hook"] for e in entries))
  by_hook = {h: verdicts([e for e in entries if e["hook"] == h]) for h in hooks}
  return _plain({"checkpoints": entries, "verdicts": by_hook[hooks[0]] if hooks else {},
                 "verdicts_by_hook": by_hook, "hook": hooks[0] if hooks else None})


def _plain(x):
  """Strict JSON: NaN -> None, numpy scalars -> Python ones, tuples -> lists."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return None if math.isnan(x) else float(x)
  return x
