"""The analysis's figures (PNG), drawn from its tables; each written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_jax import store
from sae_jax.analysis.labels import GRANULARITY_LABELS, LANGUAGE_LABELS

# Colors keyed by the label names of labels.py (a label without a color is not drawn).
LANG_COLORS = {"en": "#4477aa", "ja": "#cc6677", "bilingual": "#ddcc77", "none": "#bbbbbb"}
GRAN_COLORS = {"token": "#332288", "concept_synonym": "#88ccee", "concept_translation": "#44aa99",
               "semantic": "#117733", "other": "#bbbbbb", "multi_token": "#999933"}
assert set(LANG_COLORS) <= set(LANGUAGE_LABELS) and set(GRAN_COLORS) <= set(GRANULARITY_LABELS)
DPI = 110


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: Path) -> Path:
  """Write ``fig`` as a PNG atomically and close it."""
  store.atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=DPI), suffix=".png")
  pyplot().close(fig)
  return path


def composition(summary, kind: str, colors: dict, title: str, path: Path) -> Path:
  """Stacked shares of each label (``kind``: lang / gran) per checkpoint, one panel per hook."""
  plt = pyplot()
  base = summary[summary.seed == 0]
  hooks = list(dict.fromkeys(base.hook))
  fig, axes = plt.subplots(1, len(hooks), figsize=(max(5, 0.8 * len(base) / len(hooks) + 3)
                                                   * len(hooks), 3.6), squeeze=False)
  for ax, hook in zip(axes[0], hooks):
    rows = base[base.hook == hook]
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for name, color in colors.items():
      col = f"share_{kind}_{name}"
      if col not in rows or not rows[col].any():
        continue
      ax.bar(x, rows[col], bottom=bottom, color=color, label=name, width=0.75)
      bottom += rows[col].to_numpy()
    ax.set_xticks(x, list(rows.checkpoint), rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of live features")
    ax.set_title(f"{title} - {hook}", fontsize=10)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  return save(fig, path)


def firing_frequency(features, path: Path) -> Path:
  """Histogram of log10 firing frequency of the live features, one line per checkpoint."""
  plt = pyplot()
  base = features[features.seed == 0]
  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  bins = np.linspace(-6, 0, 40)
  ckpts = list(dict.fromkeys(base.checkpoint))
  cmap = plt.get_cmap("viridis")
  for i, c in enumerate(ckpts):
    freq = base[base.checkpoint == c].frequency.to_numpy()
    ax.hist(np.log10(np.maximum(freq, 1e-6)), bins=bins, histtype="step",
            color=cmap(i / max(len(ckpts) - 1, 1)), label=c)
  ax.set_xlabel("log10 firing frequency")
  ax.set_ylabel("live features")
  ax.set_title("Firing frequency per checkpoint", fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  return save(fig, path)


def eval_metrics(ev, path: Path) -> Path:
  """The SAEs' training-time evaluation over checkpoints, one panel per metric."""
  plt = pyplot()
  base = ev[ev.seed == 0]
  fields = [f for f in ("fvu", "ce_loss_recovered", "l0", "dead_fraction") if base[f].notna().any()]
  fig, axes = plt.subplots(1, max(len(fields), 1), figsize=(3.2 * max(len(fields), 1), 3.2),
                           squeeze=False)
  for ax, field in zip(axes[0], fields):
    for hook in dict.fromkeys(base.hook):
      rows = base[base.hook == hook]
      ax.plot(range(len(rows)), rows[field], marker="o", label=hook)
      ax.set_xticks(range(len(rows)), list(rows.checkpoint), rotation=45, ha="right",
                    fontsize=7)
    ax.set_title(field, fontsize=10)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  return save(fig, path)


def training_curves(curves, path: Path) -> Path:
  """FVU and dead fraction over each SAE's training (seed 0), one line per checkpoint."""
  plt = pyplot()
  base = curves[curves.seed == 0]
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2), squeeze=False)
  for ax, field in zip(axes[0], ("fvu", "dead_fraction")):
    for (ckpt, hook), rows in base.groupby(["checkpoint", "hook"], sort=False):
      ax.plot(rows.train_step, rows[field], label=f"{ckpt} {hook}", lw=1)
    ax.set_title(f"{field} over SAE training", fontsize=10)
    ax.set_xlabel("SAE training step", fontsize=8)
  axes[0][0].set_yscale("log")
  axes[0][1].legend(fontsize=6)
  fig.tight_layout()
  return save(fig, path)


def overlap_curves(overlap, threshold: float, path: Path, nulls=None) -> Path:
  """Left: the overlap with the next and the final checkpoint, the seed baseline at each
  checkpoint and the nulls (the final SAE against the random model's; what token identity
  predicts for the overlap with the final one). Right: the overlap as a share of the
  checkpoint's seed baseline."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
  raw, rel = axes
  for hook in dict.fromkeys(overlap.hook):
    d = overlap[overlap.hook == hook]
    ckpts = list(dict.fromkeys(d[d.kind != "seed"].a)) + [
        c for c in dict.fromkeys(d[d.kind == "seed"].a) if c not in set(d[d.kind != "seed"].a)]
    pos = {c: i for i, c in enumerate(ckpts)}
    for kind, style in (("next", "-o"), ("final", "--s")):
      k = d[d.kind == kind]
      if len(k):
        raw.plot([pos[c] for c in k.a], k.overlap, style, label=f"{hook} vs {kind}")
        if "overlap_vs_seed" in k and k.overlap_vs_seed.notna().any():
          rel.plot([pos[c] for c in k.a], k.overlap_vs_seed, style, label=f"{hook} vs {kind}")
    seed = d[d.kind == "seed"].groupby("a", sort=False).overlap.mean()
    if len(seed) > 1:
      raw.plot([pos[c] for c in seed.index], seed.to_numpy(), ":", color="gray", marker=".",
               label=f"{hook} seed baseline")
    elif len(seed) == 1:
      raw.axhline(seed.iloc[0], color="gray", ls=":", lw=1)
      raw.text(0, seed.iloc[0], f" seed baseline ({seed.index[0]})", fontsize=7,
               va="bottom", color="gray")
    if nulls is not None and len(nulls):
      n = nulls[nulls.hook == hook]
      rm = n[n.null == "random_model"]
      if len(rm):
        raw.plot([pos.get(c, np.nan) for c in rm.checkpoint], rm.overlap, "-.", color="#aa3377",
                 lw=1, label=f"{hook} vs random model ({rm.compared_to.iloc[0]})")
      ti = n[(n.null == "token_identity") & (n.kind == "final")]
      if len(ti):
        raw.plot([pos.get(c, np.nan) for c in ti.checkpoint], ti.overlap, "-.", color="#228833",
                 lw=1, label=f"{hook} token-identity null (vs final)")
    for ax in axes:
      ax.set_xticks(range(len(ckpts)), ckpts, rotation=45, ha="right", fontsize=8)
  raw.set_ylim(0, 1.05)
  raw.set_ylabel(f"share matched (corr >= {threshold:.3f})")
  raw.set_title("Feature overlap over training", fontsize=10)
  rel.axhline(1, color="gray", ls=":", lw=1)
  rel.set_ylabel("overlap / seed baseline at the checkpoint")
  rel.set_title("Overlap as a share of the seed baseline", fontsize=10)
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  fig.tight_layout()
  return save(fig, path)


def lineage(lineage_df, checkpoints: list[str], path: Path) -> Path:
  """Birth checkpoints of the final features, and their survival (lineage length)."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  births = lineage_df.groupby("birth").size().reindex(checkpoints, fill_value=0)
  axes[0].bar(range(len(births)), births.to_numpy(), color="#4477aa")
  axes[0].set_xticks(range(len(births)), checkpoints, rotation=45, ha="right", fontsize=8)
  axes[0].set_title("Birth checkpoint of the final features", fontsize=10)
  lengths = lineage_df.chain_length.to_numpy()
  surv = [(lengths >= n).mean() for n in range(1, len(checkpoints) + 1)]
  axes[1].step(range(1, len(checkpoints) + 1), surv, where="post")
  axes[1].set_xlabel("checkpoints back from the final one")
  axes[1].set_ylabel("share of final features")
  axes[1].set_title("Survival: lineage at least this long", fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def write_plots(tables: dict, plots_dir: Path, threshold: float | None = None,
                checkpoints: list[str] | None = None) -> dict[str, Path]:
  """Every figure of ``tables`` ({name: DataFrame}; overlap figures when 'overlap' is there and
  not empty) into ``plots_dir``: {name: path}, in the order the report shows them."""
  plots_dir.mkdir(parents=True, exist_ok=True)
  summary, features = tables["summary"], tables["features"]
  out = {
      "language_composition": composition(summary, "lang", LANG_COLORS, "Language of features",
                                          plots_dir / "language_composition.png"),
      "granularity_composition": composition(summary, "gran", GRAN_COLORS,
                                             "Granularity of features",
                                             plots_dir / "granularity_composition.png"),
      "firing_frequency": firing_frequency(features, plots_dir / "firing_frequency.png"),
      "eval_metrics": eval_metrics(tables["eval"], plots_dir / "eval_metrics.png")}
  curves = tables.get("curves")
  if curves is not None and not curves.empty:
    out["training_curves"] = training_curves(curves, plots_dir / "training_curves.png")
  overlap, lineage_df = tables.get("overlap"), tables.get("lineage")
  if overlap is not None and not overlap.empty:
    out["overlap"] = overlap_curves(overlap, threshold, plots_dir / "overlap.png",
                                    tables.get("nulls"))
    if not lineage_df.empty:
      out["lineage"] = lineage(lineage_df, checkpoints, plots_dir / "lineage.png")
  return out
