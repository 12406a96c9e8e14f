"""Tables (parquet + CSV), plots (PNG) and the offline HTML report with its feature browser."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from sae_jax import store
from sae_jax.analysis.labels import (GRANULARITY_LABELS, LANGUAGE_LABELS, granularity_labels,
                                     language_labels)
from sae_jax.analysis.lexicon import clean_token

EVAL_FIELDS = ("fvu", "l0", "dead_fraction", "cosine", "ce_loss_recovered", "delta_lm_loss",
               "kl_sae")


def _top_tokens(stats, f: int, token_text, n: int = 5) -> tuple[str, list]:
  toks, counts = stats.token_counts(f)
  total = max(int(stats.count[f]), 1)
  top = [(clean_token(token_text[t]) or token_text[t], round(float(c) / total, 3))
         for t, c in zip(toks[:n], counts[:n])]
  return "; ".join(f"{t} ({s:.2f})" for t, s in top), top


def build_tables(pairs, stats, evalset, lexicon, cfg) -> dict:
  """{'features', 'summary', 'eval'} DataFrames (+ per-pair label arrays for the report)."""
  import pandas as pd
  feature_rows, summary_rows, eval_rows, labels = [], [], [], {}
  top_list = {}  # (pair key, feature) -> [(token, share)], for the report's cards
  has_truth = lexicon is not None and lexicon.source.startswith("toy world")
  for p in pairs:
    st = stats[p.key]
    lang = language_labels(st, evalset.ids, evalset.token_text, evalset.language, cfg.labels)
    gran = granularity_labels(st, evalset.ids, evalset.token_text, lexicon, cfg.labels)
    labels[p.key] = {**lang, **gran}
    live = np.nonzero(st.live)[0]
    rng = np.random.default_rng([cfg.sample_seed, p.seed])
    sample = np.sort(rng.choice(live, size=min(cfg.sample_size, live.size), replace=False))
    in_sample = np.zeros(st.d_sae, bool)
    in_sample[sample] = True
    entropy = st.token_entropy()
    # Firing frequency per language: firings on tokens of a language / that language's tokens.
    lang_tokens = np.bincount(np.clip(evalset.language[evalset.mask].astype(np.int64), 0, 4),
                              minlength=5)
    freq_lang = st.lang_count / np.maximum(lang_tokens, 1)[:, None]
    n_ex = st.examples(cfg.labels.example_fraction)[0].sum(1)
    for f in live:
      top, top_list[(p.key, int(f))] = _top_tokens(st, int(f), evalset.token_text)
      feature_rows.append({
          "checkpoint": p.checkpoint, "step": p.step, "hook": p.hook, "seed": p.seed,
          "feature": int(f), "frequency": float(st.frequency[f]),
          "frequency_en": float(freq_lang[0, f]), "frequency_ja": float(freq_lang[1, f]),
          "mean_act": float(st.mean_act[f]), "max_act": float(st.act_max[f]),
          "token_entropy": float(entropy[f]), "n_examples": int(n_ex[f]),
          "language": lang["language"][f], "language_meta": lang["language_meta"][f],
          "language_truth": lang["language_truth"][f] if has_truth else None,
          "en_share": float(lang["en_share"][f]), "granularity": gran["granularity"][f],
          "granularity_truth": gran["granularity_truth"][f] if has_truth else None,
          "top_tokens": top, "in_sample": bool(in_sample[f])})
    row = {"checkpoint": p.checkpoint, "step": p.step, "hook": p.hook, "seed": p.seed,
           "n_features": st.d_sae, "n_live": int(live.size), "n_dead": int(st.d_sae - live.size),
           "eval_tokens": st.n_tokens, "sample_size": int(sample.size),
           "sample_seed": cfg.sample_seed}
    for kind, names, arr in (("lang", LANGUAGE_LABELS, lang["language"]),
                             ("gran", GRANULARITY_LABELS, gran["granularity"])):
      for name in names:
        if name == "dead":
          continue
        n_all = int((arr[live] == name).sum())
        row[f"n_{kind}_{name}"] = n_all
        row[f"share_{kind}_{name}"] = n_all / max(live.size, 1)
        row[f"sample_share_{kind}_{name}"] = (float((arr[sample] == name).mean())
                                              if sample.size else float("nan"))
    if has_truth and live.size:
      row["agreement_language"] = float((lang["language"][live] ==
                                         lang["language_truth"][live]).mean())
      row["agreement_granularity"] = float((gran["granularity"][live] ==
                                            gran["granularity_truth"][live]).mean())
    else:
      row["agreement_language"] = row["agreement_granularity"] = float("nan")
    row["agreement_language_meta"] = (float((lang["language"][live] ==
                                             lang["language_meta"][live]).mean())
                                      if live.size else float("nan"))
    summary_rows.append(row)
    ev_path = p.path / "eval.json"
    ev = store.read_json(ev_path) if ev_path.exists() else {}
    eval_rows.append({"checkpoint": p.checkpoint, "step": p.step, "hook": p.hook, "seed": p.seed,
                      **{k: ev.get(k, float("nan")) for k in EVAL_FIELDS}})
  return {"features": pd.DataFrame(feature_rows), "summary": pd.DataFrame(summary_rows),
          "eval": pd.DataFrame(eval_rows), "labels": labels, "has_truth": has_truth,
          "top_tokens": top_list}


def write_tables(tables: dict, out: Path) -> dict:
  """parquet + CSV of every table, written atomically; returns {name: path}."""
  written = {}
  for name in ("features", "summary", "eval"):
    df = tables[name]
    for ext in ("parquet", "csv"):
      path = out / f"{name}.{ext}"
      tmp = path.with_name(path.name + ".tmp")
      if ext == "parquet":
        df.to_parquet(tmp, index=False)
      else:
        df.to_csv(tmp, index=False)
      tmp.replace(path)
      written[f"{name}.{ext}"] = path
  return written


# ---- plots -----------------------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


LANG_COLORS = {"en": "#4477aa", "ja": "#cc6677", "bilingual": "#ddcc77", "none": "#bbbbbb"}
GRAN_COLORS = {"token": "#332288", "concept_synonym": "#88ccee", "concept_translation": "#44aa99",
               "semantic": "#117733", "other": "#bbbbbb", "multi_token": "#999933"}


def _stacked(summary, kind: str, colors: dict, title: str, path: Path) -> None:
  plt = _plt()
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _freq_hist(features, path: Path) -> None:
  plt = _plt()
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _eval_plot(ev, path: Path) -> None:
  plt = _plt()
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- the HTML report -------------------------------------------------------------------------

def _contexts(stats, evalset, labels_f: int, codes, row_of, cfg) -> list:
  """Top contexts of one feature: tokens around its maximum with the feature's activations."""
  out = []
  values, indices = codes
  for e in range(min(cfg.contexts_per_feature, stats.ex_val.shape[1])):
    v = stats.ex_val[labels_f, e]
    if not np.isfinite(v):
      break
    s, t = int(stats.ex_seq[labels_f, e]), int(stats.ex_pos[labels_f, e])
    lo, hi = max(0, t - cfg.context_window), min(evalset.ids.shape[1], t + cfg.context_window + 1)
    toks = []
    for j in range(lo, hi):
      r = row_of[s, j]
      if not evalset.attn[s, j]:  # padding
        continue
      a = 0.0
      if r >= 0:
        hit = indices[r] == labels_f
        a = float(values[r][hit].sum())
      toks.append([clean_token(evalset.token_text[evalset.ids[s, j]]) or
                   evalset.token_text[evalset.ids[s, j]], round(a, 4), j == t])
    out.append({"max": round(float(v), 4), "tokens": toks})
  return out


def write_report(tables, pairs, stats, evalset, cfg, out: Path, workdir: Path) -> dict:
  """Plots and report.html (self-contained apart from the PNGs beside it)."""
  import pandas as pd
  plots = out / "plots"
  plots.mkdir(exist_ok=True)
  summary, features, ev = tables["summary"], tables["features"], tables["eval"]
  written = {}
  for name, fn in (("language_composition", lambda p: _stacked(
      summary, "lang", LANG_COLORS, "Language of features", p)),
                   ("granularity_composition", lambda p: _stacked(
      summary, "gran", GRAN_COLORS, "Granularity of features", p)),
                   ("firing_frequency", lambda p: _freq_hist(features, p)),
                   ("eval_metrics", lambda p: _eval_plot(ev, p))):
    path = plots / f"{name}.png"
    fn(path)
    written[f"plots/{name}.png"] = path
  row_of = np.full(evalset.ids.shape, -1, np.int64)
  row_of[evalset.mask] = np.arange(int(evalset.mask.sum()))
  cards = {}
  lineage = tables.get("lineage_links", {})
  for p in pairs:
    st = stats[p.key]
    f_rows = features[(features.checkpoint == p.checkpoint) & (features.hook == p.hook) &
                      (features.seed == p.seed)]
    chosen = f_rows[f_rows.in_sample]
    rest = f_rows[~f_rows.in_sample].sort_values("frequency", ascending=False)
    chosen = pd.concat([chosen, rest.head(max(cfg.browser_features - len(chosen), 0))])
    codes_file = out / "codes" / p.checkpoint / (p.path.name + ".npz")
    with np.load(codes_file, allow_pickle=False) as z:
      codes = (z["values"], z["indices"])
    items = []
    for r in chosen.itertuples():
      items.append({
          "f": int(r.feature), "freq": r.frequency, "freq_en": r.frequency_en,
          "freq_ja": r.frequency_ja, "mean": round(r.mean_act, 4),
          "max": round(r.max_act, 4), "entropy": round(r.token_entropy, 3),
          "lang": r.language, "lang_meta": r.language_meta, "lang_truth": r.language_truth,
          "gran": r.granularity, "gran_truth": r.granularity_truth, "sample": bool(r.in_sample),
          "top": tables["top_tokens"][(p.key, int(r.feature))], "ctx": _contexts(st, evalset, r.feature, codes, row_of, cfg),
          "links": lineage.get(p.key, {}).get(int(r.feature), [])})
    cards[p.key] = {"checkpoint": p.checkpoint, "hook": p.hook, "seed": p.seed,
                    "items": items}
  summary_html = _table_html(summary, ["checkpoint", "hook", "seed", "n_live", "n_dead"] +
                             [f"share_lang_{x}" for x in ("en", "ja", "bilingual")] +
                             [f"share_gran_{x}" for x in GRAN_COLORS] +
                             ["agreement_language", "agreement_granularity"])
  extra = tables.get("overlap_html", "")
  page = _PAGE.replace("__TITLE__", html.escape(str(workdir.name)))
  page = page.replace("__SUMMARY__", summary_html)
  page = page.replace("__EVAL__", _table_html(ev, ["checkpoint", "hook", "seed"] +
                                              list(EVAL_FIELDS)))
  page = page.replace("__OVERLAP__", extra)
  page = page.replace("__PLOTS__", "".join(
      f'<figure><img src="plots/{n}.png" alt="{n}"><figcaption>{n.replace("_", " ")}'
      "</figcaption></figure>" for n in ("language_composition", "granularity_composition",
                                         "firing_frequency", "eval_metrics")
      + tuple(tables.get("overlap_plots", ()))))
  page = page.replace("__DATA__", json.dumps(cards, ensure_ascii=False).replace("</", "<\\/"))
  path = out / "report.html"
  tmp = path.with_name("report.html.tmp")
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(path)
  written["report.html"] = path
  return written


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    return "" if np.isnan(v) else f"{v:.3f}"
  return html.escape(str(v))


def _table_html(df, cols) -> str:
  cols = [c for c in cols if c in df.columns]
  head = "".join(f"<th>{html.escape(c.replace('share_', '').replace('_', ' '))}</th>"
                 for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                 for row in df[cols].itertuples(index=False))
  return f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sae_jax report - __TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.tbl{border-collapse:collapse;font-size:12px;margin:.5em 0}
.tbl td,.tbl th{border:1px solid #ddd;padding:3px 6px;text-align:right}
.tbl th{background:#f4f4f4} figure{display:inline-block;margin:.5em} img{max-width:680px}
#browser{display:flex;gap:1em} #list{width:360px;max-height:640px;overflow:auto;
border:1px solid #ddd} #list div{padding:3px 6px;cursor:pointer;font-size:12px;
border-bottom:1px solid #f0f0f0} #list div:hover{background:#eef} #card{flex:1;
border:1px solid #ddd;padding:.8em;min-height:300px} .ctx{font-family:monospace;margin:.3em 0;
line-height:1.7} .tok{padding:1px 2px;border-radius:3px} .max{outline:2px solid #c33}
.lbl{display:inline-block;padding:1px 6px;border-radius:8px;background:#eee;margin-right:4px;
font-size:12px} select,input{margin-right:.6em}
</style></head><body>
<h1>sae_jax analysis: __TITLE__</h1>
<h2>Feature populations per checkpoint</h2>__SUMMARY__
<h2>SAE quality per checkpoint</h2>__EVAL__
<h2>Figures</h2>__PLOTS__
__OVERLAP__
<h2>Feature browser</h2>
<div>checkpoint/hook <select id="pair"></select> language <select id="lang"><option value="">any
</option><option>en</option><option>ja</option><option>bilingual</option><option>none</option>
</select> granularity <select id="gran"><option value="">any</option><option>token</option>
<option>concept_synonym</option><option>concept_translation</option><option>semantic</option>
<option>other</option><option>multi_token</option></select>
<label><input type="checkbox" id="sample">sample only</label>
token <input id="q" size="10"> <span id="count"></span></div>
<div id="browser"><div id="list"></div><div id="card">Choose a feature on the left.</div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
for (const k of Object.keys(DATA)) { const o = document.createElement('option'); o.value = k;
  o.textContent = k; $('pair').appendChild(o); }
function items() {
  const d = DATA[$('pair').value]; if (!d) return [];
  const q = $('q').value.trim();
  return d.items.filter(it => (!$('lang').value || it.lang === $('lang').value) &&
    (!$('gran').value || it.gran === $('gran').value) && (!$('sample').checked || it.sample) &&
    (!q || it.top.some(t => t[0].includes(q))));
}
function renderList() {
  const list = items(); $('list').innerHTML = '';
  $('count').textContent = list.length + ' features';
  for (const it of list) { const div = document.createElement('div');
    div.className = 'feat'; div.dataset.f = it.f;
    div.textContent = '#' + it.f + '  ' + it.lang + ' / ' + it.gran + '  ' +
      it.top.slice(0, 3).map(t => t[0]).join(' ');
    div.onclick = () => { location.hash = encodeURIComponent($('pair').value + ':' + it.f); };
    $('list').appendChild(div); }
}
function showCard(it) {
  let h = '<h3 id="card-title">feature ' + it.f + ' <small>(' + esc($('pair').value) + ')</small></h3>';
  h += '<span class="lbl">language: ' + esc(it.lang) + '</span>';
  h += '<span class="lbl">by metadata: ' + esc(it.lang_meta) + '</span>';
  if (it.lang_truth) h += '<span class="lbl">truth: ' + esc(it.lang_truth) + '</span>';
  h += '<span class="lbl">granularity: ' + esc(it.gran) + '</span>';
  if (it.gran_truth) h += '<span class="lbl">truth: ' + esc(it.gran_truth) + '</span>';
  h += '<p>firing frequency ' + it.freq.toExponential(2) + ' (en ' +
    it.freq_en.toExponential(2) + ', ja ' + it.freq_ja.toExponential(2) + '), mean ' +
    it.mean + ', max ' +
    it.max + ', token entropy ' + it.entropy + ' nats</p>';
  h += '<p>top tokens: ' + it.top.map(t => esc(t[0]) + ' (' + t[1] + ')').join(', ') + '</p>';
  if (it.links.length) h += '<p>matched: ' + it.links.map(l => '<a href="#" class="link" ' +
    'data-pair="' + esc(l[0]) + '" data-f="' + l[1] + '">' + esc(l[0]) + ' #' + l[1] + '</a> (' +
    l[2] + ')').join(', ') + '</p>';
  h += '<h4>top contexts</h4>';
  for (const c of it.ctx) { h += '<div class="ctx">';
    for (const t of c.tokens) { const a = c.max > 0 ? Math.min(t[1] / c.max, 1) : 0;
      h += '<span class="tok' + (t[2] ? ' max' : '') + '" title="' + t[1] +
        '" style="background:rgba(255,140,0,' + a.toFixed(2) + ')">' + esc(t[0]) + '</span> '; }
    h += ' <small>max ' + c.max + '</small></div>'; }
  $('card').innerHTML = h;
  for (const a of document.querySelectorAll('a.link')) a.onclick = e => { e.preventDefault();
    location.hash = encodeURIComponent(a.dataset.pair + ':' + a.dataset.f); };
}
for (const id of ['pair', 'lang', 'gran', 'sample', 'q']) $(id).oninput = renderList;
// A card is linkable: report.html#<checkpoint>/<hook>:<feature> opens it.
function fromHash() {
  const m = decodeURIComponent(location.hash.slice(1)).match(/^(.*):(\\d+)$/);
  if (!m || !DATA[m[1]]) { renderList(); return; }
  $('pair').value = m[1]; renderList();
  const it = DATA[m[1]].items.find(x => x.f == m[2]);
  if (it) showCard(it);
}
window.onhashchange = fromHash;
fromHash();
</script></body></html>
"""
