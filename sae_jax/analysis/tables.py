"""The analysis as tables (pandas DataFrames; written as parquet + CSV by the store).

    features   one row per live (checkpoint, hook, seed, feature)
    summary    one row per SAE: label counts and shares (all live features and the sample),
               agreement of the labels (the paper's language rule; the script variant too)
               with the ground truth and with the metadata
    paper      one row per SAE: the paper's language rule beside the script variant, the
               paper's four granularity classes with Wilson 95 % intervals
    eval       one row per SAE: its training-time evaluation (eval.json)
    overlap    one row per comparison of two SAEs (lineage.Comparison), with the seed baseline
               of the compared checkpoint and the overlap as a share of it
    lineage    one row per eligible feature of each hook's final SAE (lineage.Lineage)
    merges     one row per merge or split between consecutive checkpoints (lineage.MergeRow)
    nulls      one row per null overlap: random_model, token_identity (lineage.NullRow)
    thresholds the headline numbers at each threshold of the sweep (the one in use flagged)
    calibration  the threshold each seed pair gives at the false-match rate
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import numpy as np

from sae_jax.analysis.config import AnalysisConfig
from sae_jax.analysis.describe import SAEFeatures
from sae_jax.analysis.granularity import GRANULARITIES
from sae_jax.analysis.labels import GRANULARITY_LABELS, LANGUAGE_LABELS, ExampleLabels
from sae_jax.analysis.lineage import OverlapResult
from sae_jax.analysis.paper import PAPER_LANGUAGES
from sae_jax.store import SAERecord

if TYPE_CHECKING:
  import pandas as pd

EVAL_FIELDS = ("fvu", "l0", "dead_fraction", "cosine", "ce_loss_recovered", "delta_lm_loss",
               "kl_sae")


def _frame(rows: list[dict]):
  import pandas as pd  # deferred: importing sae_jax does not load pandas
  return pd.DataFrame(rows)


def _sae_columns(r: SAERecord) -> dict:
  return {"checkpoint": r.checkpoint, "step": r.step, "hook": r.hook, "seed": r.seed}


def format_top_tokens(top: list[tuple[str, float]]) -> str:
  """``dog (0.52); cat (0.20)``: the top_tokens column."""
  return "; ".join(f"{t} ({s:.2f})" for t, s in top)


def features_table(saes: list[SAEFeatures], cfg: AnalysisConfig, ground_truth: bool
                   ) -> pd.DataFrame:
  """One row per live feature of every SAE (``ground_truth``: fill the *_truth columns)."""
  rows = []
  for d in saes:
    st, lab = d.stats, d.labels
    in_sample = np.zeros(st.d_sae, bool)
    in_sample[d.sample] = True
    entropy = st.token_entropy()
    n_ex = st.examples(cfg.labels.example_fraction)[0].sum(1)
    for f in d.live:
      rows.append({
          **_sae_columns(d.record), "feature": int(f), "frequency": float(st.frequency[f]),
          "frequency_en": float(d.language_frequency[0, f]),
          "frequency_ja": float(d.language_frequency[1, f]),
          "mean_act": float(st.mean_act[f]), "max_act": float(st.act_max[f]),
          "token_entropy": float(entropy[f]), "n_examples": int(n_ex[f]),
          "language": lab.language[f], "language_meta": lab.language_meta[f],
          "language_truth": lab.language_truth[f] if ground_truth else None,
          "en_share": float(lab.en_share[f]), **_paper_columns(lab, f),
          "granularity": lab.granularity[f],
          "granularity_truth": lab.granularity_truth[f] if ground_truth else None,
          "top_tokens": format_top_tokens(d.top_tokens[int(f)]),
          "in_sample": bool(in_sample[f])})
  return _frame(rows)


def _paper_columns(lab, f: int) -> dict:
  """The paper's rules of one feature (None where the labels were made without codes)."""
  if not lab.by_paper_rule:
    return {"n_en": None, "n_ja": None, "language_script": lab.language[f],
            "granularity_paper": None}
  return {"n_en": int(lab.n_en[f]), "n_ja": int(lab.n_ja[f]),
          "language_script": lab.language_script[f],
          "granularity_paper": lab.granularity_paper[f]}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval of a binomial share k / n (95 % by default; (nan, nan) if n = 0)."""
  if n <= 0:
    return float("nan"), float("nan")
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def paper_labels_table(saes: list[SAEFeatures]) -> pd.DataFrame:
  """One row per SAE: the paper's language rule and the script variant side by side (counts
  over live features; ``n_paper_none``: live features without the paper's examples), and the
  paper's four granularity classes with Wilson 95 % intervals over the ``n_labelled`` live
  features that have examples (the paper labels only those)."""
  rows = []
  for d in saes:
    lab, live = d.labels, d.live
    if not lab.by_paper_rule:
      continue
    row = {**_sae_columns(d.record), "n_live": int(live.size)}
    for x in PAPER_LANGUAGES[:3]:
      row[f"n_paper_{x}"] = int((lab.language[live] == x).sum())
      row[f"n_script_{x}"] = int((lab.language_script[live] == x).sum())
    row["n_script_none"] = int((lab.language_script[live] == "none").sum())
    row["n_paper_none"] = int((lab.language[live] == "none").sum())
    n = row["n_labelled"] = int((lab.granularity_paper[live] != "none").sum())
    for g in GRANULARITIES:
      k = int((lab.granularity_paper[live] == g).sum())
      lo, hi = wilson_interval(k, n)
      row.update({f"n_{g}": k, f"share_{g}": k / max(n, 1), f"{g}_lo": lo, f"{g}_hi": hi})
    rows.append(row)
  return _frame(rows)


def example_labels_table(labels: list[ExampleLabels]) -> pd.DataFrame:
  """One row per feature labelled from its examples: ``feature, n_en, n_ja, language,
  granularity`` first, then the finer columns."""
  first = ["feature", "n_en", "n_ja", "language", "granularity"]
  rows = []
  for x in labels:
    d = dataclasses.asdict(x)
    rows.append({**{k: d[k] for k in first}, **{k: v for k, v in d.items() if k not in first}})
  return _frame(rows)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  return float((a == b).mean()) if a.size else float("nan")


def _summary_row(d: SAEFeatures, cfg: AnalysisConfig, ground_truth: bool) -> dict:
  st, lab, live, sample = d.stats, d.labels, d.live, d.sample
  row = {**_sae_columns(d.record), "n_features": st.d_sae, "n_live": int(live.size),
         "n_dead": int(st.d_sae - live.size), "eval_tokens": st.n_tokens,
         "sample_size": int(sample.size), "sample_seed": cfg.sample_seed}
  for kind, names, arr in (("lang", LANGUAGE_LABELS, lab.language),
                           ("gran", GRANULARITY_LABELS, lab.granularity)):
    for name in names:
      if name == "dead":
        continue
      n_all = int((arr[live] == name).sum())
      row[f"n_{kind}_{name}"] = n_all
      row[f"share_{kind}_{name}"] = n_all / max(live.size, 1)
      row[f"sample_share_{kind}_{name}"] = (float((arr[sample] == name).mean())
                                            if sample.size else float("nan"))
  truth = ground_truth and live.size
  row["agreement_language"] = (_agreement(lab.language[live], lab.language_truth[live])
                               if truth else float("nan"))
  row["agreement_granularity"] = (_agreement(lab.granularity[live], lab.granularity_truth[live])
                                  if truth else float("nan"))
  row["agreement_language_meta"] = _agreement(lab.language[live], lab.language_meta[live])
  if lab.by_paper_rule:
    row["agreement_language_script"] = (
        _agreement(lab.language_script[live], lab.language_truth[live]) if truth else
        float("nan"))
  return row


def summary_table(saes: list[SAEFeatures], cfg: AnalysisConfig, ground_truth: bool
                  ) -> pd.DataFrame:
  """One row per SAE: label counts and shares, agreement with the truth and the metadata."""
  return _frame([_summary_row(d, cfg, ground_truth) for d in saes])


def eval_table(records: list[SAERecord], evals: dict[str, dict]) -> pd.DataFrame:
  """One row per SAE from ``evals`` ({record key: its eval.json}; missing fields NaN)."""
  return _frame([{**_sae_columns(r),
                        **{k: evals.get(r.key, {}).get(k, float("nan")) for k in EVAL_FIELDS}}
                       for r in records])


def curves_table(records: list[SAERecord]) -> pd.DataFrame:
  """One row per logged training step of each SAE (its metrics.jsonl, train split): FVU and
  dead fraction over training, to show they have flattened."""
  rows = []
  for r in records:
    path = r.run.metrics
    if not path.exists():
      continue
    for line in path.read_text().splitlines():
      m = json.loads(line) if line.strip() else {}
      if m.get("split", "train") == "train" and "fvu" in m:
        rows.append({**_sae_columns(r), "train_step": m["step"], "fvu": m["fvu"],
                     "dead_fraction": m.get("dead_fraction", float("nan"))})
  return _frame(rows)


def overlap_table(result: OverlapResult) -> pd.DataFrame:
  """One row per comparison. A measure a kind of comparison lacks is left out of its row
  (an empty cell), and the columns come in the order their rows first name them."""
  rows = []
  for c in result.comparisons:
    row = {"hook": c.hook, "kind": c.kind, "a": c.a, "b": c.b, "step": c.step,
           "overlap": c.overlap}
    if c.kind == "seed":
      row.update(overlap_decoder=c.overlap_decoder, mean_best=c.mean_best)
    else:
      row["mean_best"] = c.mean_best
      if c.overlap_decoder is not None:
        row["overlap_decoder"] = c.overlap_decoder
    if c.kind != "seed":
      row.update(seed_baseline=_nan(c.seed_baseline), overlap_vs_seed=_nan(c.overlap_vs_seed))
    row.update({f"overlap_lang_{k}": v for k, v in c.overlap_language.items()})
    row.update({f"overlap_gran_{k}": v for k, v in c.overlap_granularity.items()})
    rows.append(row)
  return _frame(rows)


def _nan(v) -> float:
  return float("nan") if v is None else float(v)


def _ids(x) -> str:
  return ";".join(map(str, x))


def merges_table(result: OverlapResult):
  """One row per merge or split; several features are joined by ';' (``features_from`` of a
  merge, ``feature_to`` of a split), their languages in the same order."""
  cols = ["hook", "checkpoint_from", "checkpoint_to", "kind", "feature_to", "features_from",
          "languages_from", "language_to", "score", "best_single"]
  rows = [{"hook": x.hook, "checkpoint_from": x.checkpoint_from,
           "checkpoint_to": x.checkpoint_to, "kind": x.kind, "feature_to": _ids(x.features_to),
           "features_from": _ids(x.features_from), "languages_from": _ids(x.languages_from),
           "language_to": _ids(x.languages_to), "score": x.score, "best_single": x.best_single}
          for x in result.merges]
  import pandas as pd  # deferred: importing sae_jax does not load pandas
  return pd.DataFrame(rows, columns=cols)


def merge_counts(merges, checkpoints: list[str]):
  """Per hook and consecutive checkpoint pair: merges, splits, and the merges of features of
  both languages (en and ja among the parts) into a bilingual one."""
  import pandas as pd
  rows = []
  for hook in dict.fromkeys(merges.hook) if len(merges) else []:
    d = merges[merges.hook == hook]
    for a, b in zip(checkpoints[:-1], checkpoints[1:]):
      x = d[(d.checkpoint_from == a) & (d.checkpoint_to == b)]
      mg = x[x.kind == "merge"]
      parts = mg.languages_from.str.split(";")
      bil = mg[(mg.language_to == "bilingual").to_numpy() &
               parts.map(lambda p: "en" in p and "ja" in p).to_numpy()]
      rows.append({"hook": hook, "checkpoint_from": a, "checkpoint_to": b, "merges": len(mg),
                   "splits": int((x.kind == "split").sum()), "merges_en_ja_to_bilingual": len(bil),
                   "merges_to_bilingual": int((mg.language_to == "bilingual").sum())})
  return pd.DataFrame(rows, columns=["hook", "checkpoint_from", "checkpoint_to", "merges",
                                     "splits", "merges_en_ja_to_bilingual",
                                     "merges_to_bilingual"])


def nulls_table(result: OverlapResult):
  """One row per null overlap, beside the overlap observed for the same comparison."""
  import pandas as pd
  cols = ["null", "hook", "kind", "checkpoint", "compared_to", "overlap", "observed"]
  return pd.DataFrame([{"null": x.null, "hook": x.hook, "kind": x.kind,
                        "checkpoint": x.checkpoint, "compared_to": x.compared_to,
                        "overlap": x.overlap, "observed": _nan(x.observed)}
                       for x in result.nulls], columns=cols)


def thresholds_table(result: OverlapResult):
  """The headline numbers at each threshold of the sweep (lineage._headline)."""
  return _frame(result.sweep)


def calibration_table(result: OverlapResult):
  """Per seed pair: the threshold it alone gives at the false-match rate, and its overlap at
  the threshold in use."""
  return _frame([dataclasses.asdict(x) for x in result.calibration])


def lineage_table(result: OverlapResult) -> pd.DataFrame:
  """One row per live feature of each hook's final SAE: its birth and its chain back."""
  return _frame([{"hook": x.hook, "feature": x.feature, "birth": x.birth,
                  "birth_step": x.birth_step, "chain_length": len(x.chain),
                  "chain": " <- ".join("?" if c < 0 else str(c) for c in x.chain),
                  "gaps": x.gaps, "language": x.language, "granularity": x.granularity,
                  "language_specific_ancestor": x.language_specific_ancestor,
                  "ancestor_expected": x.ancestor_expected}
                 for x in result.lineages])
