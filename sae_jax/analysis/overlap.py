"""Feature overlap and lineage over training time.

Matching two SAEs (A -> B):

* ``match_activations(codes_a, codes_b)`` (primary): the Pearson correlation of two features'
  activations over the same evaluation tokens, for *every* pair, computed from the top-k codes
  as a sparse product (co-activation sums A^T B in blocks of A's features; cost tokens x k_a x
  k_b, memory one [block, M_b] dense block). It works although the residual basis moves
  between checkpoints.
* ``match_decoders(sae_a, sae_b)`` (secondary): cosine similarity of decoder rows, in blocks on
  device keeping the top candidates per row; meaningful between seeds of one checkpoint, nearby
  checkpoints, or warm-started SAEs.

Both return a :class:`Matching`: per A feature its best partner and score, its top
``n_candidates`` partners, whether the best is mutual, and a one-to-one assignment maximising
the total similarity over the candidate pairs (a sparse min-cost bipartite matching, LAPJVsp via
SciPy, with an "unmatched" option of score 0 for every feature - never a dense M x M Hungarian).

Over a trace: each checkpoint against the next and against the final one, the seed baseline
(two SAEs of one checkpoint that differ only in their init seed: how much two runs on the *same*
activations share), lineage chains across consecutive checkpoints, birth checkpoints, survival.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sae_jax.errors import DataError


@dataclasses.dataclass
class Matching:
  """A -> B feature matching (arrays over A's features)."""

  best: np.ndarray  # [M_a] best partner in B (-1: none)
  best_score: np.ndarray  # [M_a]
  candidates: np.ndarray  # [M_a, C] top partners, best first (-1 padded)
  candidate_scores: np.ndarray  # [M_a, C]
  mutual: np.ndarray  # [M_a] bool: A's best partner has A as its best partner too
  assignment: np.ndarray  # [M_a] one-to-one partner (-1: unassigned)
  assignment_score: np.ndarray  # [M_a] (0 where unassigned)

  def overlap(self, threshold: float, among: np.ndarray | None = None) -> float:
    """Share of A's features (``among``, a mask) assigned a partner scoring >= threshold."""
    ok = (self.assignment >= 0) & (self.assignment_score >= threshold)
    return float(ok[among].mean()) if among is not None and among.any() else (
        float(ok.mean()) if among is None else float("nan"))


def _as_codes(codes) -> tuple[np.ndarray, np.ndarray]:
  values, indices = (np.asarray(c) for c in codes)
  if values.shape != indices.shape or values.ndim != 2:
    raise DataError(f"codes must be (values, indices) of equal [N, k] shape, got "
                    f"{values.shape} and {indices.shape}")
  return values.astype(np.float32), indices.astype(np.int64)


def _sparse(values: np.ndarray, indices: np.ndarray, m: int):
  import scipy.sparse as sp
  n, k = values.shape
  fire = values > 0
  rows = np.repeat(np.arange(n), k).reshape(n, k)[fire]
  return sp.csr_matrix((values[fire], (rows, indices[fire])), shape=(n, m), dtype=np.float64)


def match_activations(codes_a, codes_b, d_sae_a: int | None = None, d_sae_b: int | None = None,
                      n_candidates: int = 8, block: int = 2048,
                      log_fn: Callable[[str], None] | None = None) -> Matching:
  """Match features by activation correlation over the same tokens.

  Args:
    codes_a, codes_b: (values [N, k_a], indices [N, k_a]) and (values [N, k_b], indices) of two
      SAEs over the same N tokens (``sae.encode`` output; values <= 0 count as not firing).
    d_sae_a, d_sae_b: latent counts (default: 1 + the largest index seen).
    n_candidates: partners kept per A feature (the assignment's candidate pairs).
    block: A features per dense [block, M_b] co-activation block (memory: 8 * block * M_b B).
  """
  va, ia = _as_codes(codes_a)
  vb, ib = _as_codes(codes_b)
  if va.shape[0] != vb.shape[0]:
    raise DataError(f"codes cover different tokens: {va.shape[0]} vs {vb.shape[0]} rows")
  n = va.shape[0]
  ma = d_sae_a or int(ia.max(initial=-1)) + 1
  mb = d_sae_b or int(ib.max(initial=-1)) + 1
  a, b = _sparse(va, ia, ma), _sparse(vb, ib, mb)
  mean_a, mean_b = np.asarray(a.sum(0)).ravel() / n, np.asarray(b.sum(0)).ravel() / n
  sq_a = np.asarray(a.multiply(a).sum(0)).ravel() / n
  sq_b = np.asarray(b.multiply(b).sum(0)).ravel() / n
  std_a = np.sqrt(np.maximum(sq_a - mean_a ** 2, 0))
  std_b = np.sqrt(np.maximum(sq_b - mean_b ** 2, 0))
  at = a.T.tocsr()
  c = min(n_candidates, mb)
  cand = np.full((ma, c), -1, np.int64)
  cand_s = np.full((ma, c), -np.inf, np.float32)
  best_b = np.full(mb, -np.inf, np.float32)  # B's best score, for mutuality
  best_b_arg = np.full(mb, -1, np.int64)
  inv_b = np.where(std_b > 0, 1 / np.maximum(std_b, 1e-30), 0)
  t0 = last = time.perf_counter()
  for lo in range(0, ma, block):
    hi = min(lo + block, ma)
    co = (at[lo:hi] @ b).toarray() / n  # E[a_i b_j] for the block
    corr = (co - np.outer(mean_a[lo:hi], mean_b)) * inv_b[None, :]
    corr *= np.where(std_a[lo:hi] > 0, 1 / np.maximum(std_a[lo:hi], 1e-30), 0)[:, None]
    corr = corr.astype(np.float32)
    top = np.argpartition(-corr, c - 1, axis=1)[:, :c] if c < mb else np.tile(
        np.arange(mb), (hi - lo, 1))
    top_s = np.take_along_axis(corr, top, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    cand[lo:hi] = np.take_along_axis(top, order, 1)
    cand_s[lo:hi] = np.take_along_axis(top_s, order, 1)
    col_best = corr.max(0)
    better = col_best > best_b
    best_b_arg[better] = lo + corr.argmax(0)[better]
    best_b[better] = col_best[better]
    if log_fn is not None and time.perf_counter() - last > 10:  # only a long match reports
      last = time.perf_counter()
      log_fn(f"activation matching: {hi:,}/{ma:,} features ({last - t0:.0f}s)")
  return _finish(cand, cand_s, best_b_arg, std_a > 0)


def match_decoders(sae_a, sae_b, n_candidates: int = 8, block: int = 4096) -> Matching:
  """Match features by decoder-row cosine similarity (rows compared in blocks on device)."""
  import jax
  import jax.numpy as jnp
  da, db = np.asarray(sae_a.params["W_dec"]), np.asarray(sae_b.params["W_dec"])
  if da.shape[1] != db.shape[1]:
    raise DataError(f"decoders live in different spaces: d_in {da.shape[1]} vs {db.shape[1]}")
  unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  da, db = jnp.asarray(unit(da)), jnp.asarray(unit(db))
  c = min(n_candidates, db.shape[0])

  @jax.jit
  def block_top(rows):
    sims = rows @ db.T
    return jax.lax.top_k(sims, c), sims.max(0), sims.argmax(0)

  ma, mb = da.shape[0], db.shape[0]
  cand = np.zeros((ma, c), np.int64)
  cand_s = np.zeros((ma, c), np.float32)
  best_b = np.full(mb, -np.inf, np.float32)
  best_b_arg = np.full(mb, -1, np.int64)
  for lo in range(0, ma, block):
    rows = da[lo:lo + block]
    (s, i), col_best, col_arg = block_top(rows)
    cand[lo:lo + rows.shape[0]] = np.asarray(i)
    cand_s[lo:lo + rows.shape[0]] = np.asarray(s)
    col_best, col_arg = np.asarray(col_best), np.asarray(col_arg)
    better = col_best > best_b
    best_b_arg[better] = lo + col_arg[better]
    best_b[better] = col_best[better]
  return _finish(cand, cand_s, best_b_arg, np.ones(ma, bool))


def _finish(cand, cand_s, best_b_arg, valid_a) -> Matching:
  best = np.where(valid_a, cand[:, 0], -1)
  best_s = np.where(valid_a, cand_s[:, 0], 0).astype(np.float32)
  mutual = (best >= 0) & (best_b_arg[np.maximum(best, 0)] == np.arange(len(best)))
  assign, assign_s = assign_one_to_one(cand, cand_s, valid_a)
  return Matching(best, best_s, cand, cand_s, mutual, assign, assign_s)


def assign_one_to_one(cand: np.ndarray, cand_s: np.ndarray, valid: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One-to-one assignment over candidate pairs maximising total score (unmatched scores 0).

  A sparse bipartite graph (A features x (B features + one private "unmatched" node per A
  feature)) solved by SciPy's min-weight full bipartite matching (LAPJVsp); only candidate
  pairs with positive score are edges.
  """
  import scipy.sparse as sp
  from scipy.sparse.csgraph import min_weight_full_bipartite_matching
  ma, c = cand.shape
  mb = int(cand.max(initial=-1)) + 1
  ok = (cand >= 0) & np.isfinite(cand_s) & (cand_s > 0)
  if valid is not None:
    ok &= valid[:, None]
  rows = np.concatenate([np.nonzero(ok)[0], np.arange(ma)])
  cols = np.concatenate([cand[ok], mb + np.arange(ma)])
  # cost = 2 - score (> 0 so SciPy keeps the edge); unmatched costs 2 (score 0).
  cost = np.concatenate([2.0 - cand_s[ok].astype(np.float64), np.full(ma, 2.0)])
  graph = sp.csr_matrix((cost, (rows, cols)), shape=(ma, mb + ma))
  _, col = min_weight_full_bipartite_matching(graph)
  assign = np.where(col < mb, col, -1).astype(np.int64)
  score = np.zeros(ma, np.float32)
  hit = assign >= 0
  lookup = {(int(r), int(cc)): float(s) for r, cc, s in zip(np.nonzero(ok)[0], cand[ok],
                                                            cand_s[ok])}
  score[hit] = [lookup[(int(r), int(assign[r]))] for r in np.nonzero(hit)[0]]
  return assign, score


# ---- over a trace ----------------------------------------------------------------------------

def _codes(out: Path, pair) -> tuple[np.ndarray, np.ndarray]:
  with np.load(out / "codes" / pair.checkpoint / (pair.path.name + ".npz"),
               allow_pickle=False) as z:
    return z["values"], z["indices"]


def analyze_overlap(pairs, saes, out: Path, tables: dict, threshold: float = 0.5,
                    log_fn: Callable[[str], None] = print) -> dict:
  """Overlap curves, seed baseline, lineage and births for every hook of a trace."""
  import pandas as pd
  labels = tables["labels"]
  rows, lineage_rows, links = [], [], {}
  for hook in dict.fromkeys(p.hook for p in pairs):
    base = [p for p in pairs if p.hook == hook and p.seed == 0]
    if len(base) < 1:
      continue
    codes = {p.key: _codes(out, p) for p in base}
    final = base[-1]
    # Seed baseline: every checkpoint that has a seed variant.
    for p in base:
      for s in [q for q in pairs if q.hook == hook and q.checkpoint == p.checkpoint and q.seed]:
        m = match_activations(codes[p.key], _codes(out, s), saes[p.key].cfg.d_sae,
                              saes[s.key].cfg.d_sae)
        md = match_decoders(saes[p.key], saes[s.key])
        live = labels[p.key]["language"] != "dead"
        rows.append({"hook": hook, "kind": "seed", "a": p.checkpoint, "b": s.key,
                     "step": p.step, "overlap": m.overlap(threshold, live),
                     "overlap_decoder": md.overlap(threshold, live),
                     "mean_best": float(m.best_score[live].mean()) if live.any() else np.nan})
    matches = {}
    for i, p in enumerate(base[:-1]):
      for q, kind in ((base[i + 1], "next"), (final, "final")):
        if (p.key, q.key) not in matches:  # "final" is "next" for the last pair
          matches[(p.key, q.key)] = match_activations(
              codes[p.key], codes[q.key], saes[p.key].cfg.d_sae, saes[q.key].cfg.d_sae,
              log_fn=log_fn)
        m = matches[(p.key, q.key)]
        live = labels[p.key]["language"] != "dead"
        row = {"hook": hook, "kind": kind, "a": p.checkpoint, "b": q.checkpoint, "step": p.step,
               "overlap": m.overlap(threshold, live),
               "mean_best": float(m.best_score[live].mean()) if live.any() else np.nan}
        if kind == "next":
          md = match_decoders(saes[p.key], saes[q.key])
          row["overlap_decoder"] = md.overlap(threshold, live)
        for name in ("en", "ja", "bilingual"):
          sel = labels[p.key]["language"] == name
          row[f"overlap_lang_{name}"] = m.overlap(threshold, sel)
        for name in ("token", "concept_synonym", "concept_translation", "semantic", "other"):
          sel = labels[p.key]["granularity"] == name
          row[f"overlap_gran_{name}"] = m.overlap(threshold, sel)
        rows.append(row)
      log_fn(f"overlap {hook}: {p.checkpoint} matched")
    # Lineage: walk every final feature back through the consecutive one-to-one assignments
    # matched above (older -> newer), read in reverse: each newer feature's predecessor.
    back = {}
    for i in range(1, len(base)):
      m = matches[(base[i - 1].key, base[i].key)]
      pred = np.full(saes[base[i].key].cfg.d_sae, -1, np.int64)
      pred_score = np.zeros(saes[base[i].key].cfg.d_sae, np.float32)
      hit = np.nonzero(m.assignment >= 0)[0]
      pred[m.assignment[hit]] = hit
      pred_score[m.assignment[hit]] = m.assignment_score[hit]
      back[base[i].key] = (pred, pred_score)
    fin_labels = labels[final.key]
    for f in np.nonzero(fin_labels["language"] != "dead")[0]:
      chain, cur, birth = [int(f)], int(f), final.checkpoint
      ancestor_specific = False
      for i in range(len(base) - 1, 0, -1):
        pred, pred_score = back[base[i].key]
        part, score = int(pred[cur]), float(pred_score[cur])
        if part < 0 or score < threshold:
          break
        cur, birth = part, base[i - 1].checkpoint
        chain.append(cur)
        if labels[base[i - 1].key]["language"][cur] in ("en", "ja"):
          ancestor_specific = True
        links.setdefault(base[i].key, {}).setdefault(
            chain[-2], []).append([base[i - 1].key, cur, round(score, 3)])
        links.setdefault(base[i - 1].key, {}).setdefault(cur, []).append(
            [base[i].key, chain[-2], round(score, 3)])
      lineage_rows.append({"hook": hook, "feature": int(f), "birth": birth,
                           "birth_step": next(p.step for p in base if p.checkpoint == birth),
                           "chain_length": len(chain), "chain": " <- ".join(map(str, chain)),
                           "language": fin_labels["language"][f],
                           "granularity": fin_labels["granularity"][f],
                           "language_specific_ancestor": ancestor_specific})
  overlap_df, lineage_df = pd.DataFrame(rows), pd.DataFrame(lineage_rows)
  written = {}
  for name, df in (("overlap", overlap_df), ("lineage", lineage_df)):
    for ext in ("csv", "parquet"):
      path = out / f"{name}.{ext}"
      tmp = path.with_name(path.name + ".tmp")
      df.to_csv(tmp, index=False) if ext == "csv" else df.to_parquet(tmp, index=False)
      tmp.replace(path)
      written[f"{name}.{ext}"] = path
  tables["lineage_links"] = {k: {f: v[:4] for f, v in d.items()} for k, d in links.items()}
  tables["overlap_plots"] = _plots(overlap_df, lineage_df, pairs, out, threshold)
  tables["overlap_html"] = _html(overlap_df, lineage_df, threshold)
  for n in tables["overlap_plots"]:
    written[f"plots/{n}.png"] = out / "plots" / f"{n}.png"
  return written


def _plots(overlap_df, lineage_df, pairs, out: Path, threshold: float) -> tuple[str, ...]:
  from sae_jax.analysis.report import _plt
  if overlap_df.empty:
    return ()
  plt = _plt()
  (out / "plots").mkdir(exist_ok=True)
  made = []
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for hook in dict.fromkeys(overlap_df.hook):
    d = overlap_df[overlap_df.hook == hook]
    for kind, style in (("next", "-o"), ("final", "--s")):
      k = d[d.kind == kind]
      if len(k):
        ax.plot(list(k.a), k.overlap, style, label=f"{hook} vs {kind}")
    seed = d[d.kind == "seed"]
    for _, r in seed.iterrows():
      ax.axhline(r.overlap, color="gray", ls=":", lw=1)
      ax.text(0, r.overlap, f" seed baseline ({r.a})", fontsize=7, va="bottom", color="gray")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel(f"share matched (corr >= {threshold})")
  ax.set_title("Feature overlap over training", fontsize=10)
  ax.tick_params(axis="x", rotation=45, labelsize=8)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "plots" / "overlap.png", dpi=110)
  plt.close(fig)
  made.append("overlap")
  if not lineage_df.empty:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    order = list(dict.fromkeys(p.checkpoint for p in pairs if p.seed == 0))
    births = lineage_df.groupby("birth").size().reindex(order, fill_value=0)
    axes[0].bar(range(len(births)), births.to_numpy(), color="#4477aa")
    axes[0].set_xticks(range(len(births)), order, rotation=45, ha="right", fontsize=8)
    axes[0].set_title("Birth checkpoint of the final features", fontsize=10)
    lengths = lineage_df.chain_length.to_numpy()
    surv = [(lengths >= n).mean() for n in range(1, len(order) + 1)]
    axes[1].step(range(1, len(order) + 1), surv, where="post")
    axes[1].set_xlabel("checkpoints back from the final one")
    axes[1].set_ylabel("share of final features")
    axes[1].set_title("Survival: lineage at least this long", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "plots" / "lineage.png", dpi=110)
    plt.close(fig)
    made.append("lineage")
  return tuple(made)


def _html(overlap_df, lineage_df, threshold: float) -> str:
  from sae_jax.analysis.report import _table_html
  if overlap_df.empty:
    return ""
  cols = ["hook", "kind", "a", "b", "overlap", "overlap_decoder", "mean_best",
          "overlap_lang_en", "overlap_lang_ja", "overlap_lang_bilingual"]
  h = (f"<h2>Feature overlap (activation correlation &ge; {threshold})</h2>" +
       _table_html(overlap_df, cols))
  if not lineage_df.empty:
    births = (lineage_df.groupby(["hook", "birth", "birth_step"], dropna=False).size()
              .reset_index(name="features").sort_values(["hook", "birth_step"]))
    h += "<h3>Births of the final features</h3>" + _table_html(births, list(births.columns))
    bil = lineage_df[lineage_df.language == "bilingual"]
    if len(bil):
      share = bil.language_specific_ancestor.mean()
      h += (f"<p>{len(bil)} final bilingual features; {share:.1%} have a language-specific "
            "predecessor in their lineage.</p>")
  return h
