"""The offline HTML report: tables, figures, the overlap summary and the feature browser.

``report.html`` is self-contained apart from the PNGs beside it; a feature card is linkable as
``report.html#<checkpoint>/<hook>:<feature>``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from sae_jax import store
from sae_jax.analysis.config import AnalysisConfig
from sae_jax.analysis.describe import SAEFeatures
from sae_jax.analysis.evalset import EvalSet
from sae_jax.analysis.findings import findings_html
from sae_jax.analysis.granularity import GRANULARITIES
from sae_jax.analysis.labels import GRANULARITY_LABELS, LANGUAGE_LABELS
from sae_jax.analysis.lexicon import clean_token
from sae_jax.analysis.lineage import BY_LANGUAGE, Codes, Link
from sae_jax.analysis.tables import EVAL_FIELDS, merge_counts
from sae_jax.store import SAERecord

SUMMARY_COLUMNS = (["checkpoint", "hook", "seed", "n_live", "n_dead"] +
                   [f"share_lang_{x}" for x in BY_LANGUAGE] +
                   [f"share_gran_{x}" for x in GRANULARITY_LABELS if x != "dead"] +
                   ["agreement_language", "agreement_language_script",
                    "agreement_granularity"])
OVERLAP_COLUMNS = ["hook", "kind", "a", "b", "overlap", "seed_baseline", "overlap_vs_seed",
                   "overlap_decoder", "mean_best"] + [f"overlap_lang_{x}" for x in BY_LANGUAGE]
MERGES_LISTED = 300  # merge / split rows listed in the report (all are in merges.csv)


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    return "" if np.isnan(v) else f"{v:.3f}"
  return html.escape(str(v))


def table_html(df, cols) -> str:
  """An HTML table of ``df``'s columns ``cols`` (those it has); floats to 3 decimals."""
  cols = [c for c in cols if c in df.columns]
  head = "".join(f"<th>{html.escape(c.replace('share_', '').replace('_', ' '))}</th>"
                 for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                 for row in df[cols].itertuples(index=False))
  return f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def paper_html(paper) -> str:
  """The paper's rules per SAE: language by the paper's rule beside the script variant, and
  the four granularity classes as share [Wilson 95 % interval]."""
  if paper is None or paper.empty:
    return ""
  lang_cols = ["checkpoint", "hook", "seed", "n_live"] + [
      f"n_{rule}_{x}" for x in ("en", "ja", "bilingual") for rule in ("paper", "script")] + [
      "n_script_none", "n_paper_none", "n_labelled"]
  rows = "".join(
      "<tr>" + "".join(f"<td>{_fmt(getattr(r, c))}</td>" for c in ("checkpoint", "hook", "seed"))
      + "".join(f"<td>{getattr(r, f'n_{g}')} ({getattr(r, f'share_{g}'):.1%} "
                f"[{getattr(r, f'{g}_lo'):.1%}, {getattr(r, f'{g}_hi'):.1%}])</td>"
                for g in GRANULARITIES) + "</tr>" for r in paper.itertuples())
  head = "".join(f"<th>{h}</th>" for h in ("checkpoint", "hook", "seed") + GRANULARITIES)
  return ("<h2>Language: the paper's rule beside the script variant (live features; "
          "n_paper_none: without the paper's examples)</h2>" +
          table_html(paper, lang_cols) +
          "<h2>Granularity in the paper's four classes (share of the n_labelled features with "
          "examples [Wilson 95 % interval])</h2>"
          f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')


def _card_link(checkpoint: str, hook: str, features: str) -> str:
  """Links to the feature cards of ``features`` ('3;7') of one SAE."""
  return ", ".join(f'<a href="#{html.escape(checkpoint)}/{html.escape(hook)}:{f}">#{f}</a>'
                   for f in str(features).split(";") if f)


def merges_html(merges, checkpoints: list[str]) -> str:
  """Merges and splits: counts per checkpoint pair, then the list with links to the cards."""
  if merges is None:
    return ""
  h = ("<h3>Merges and splits between consecutive checkpoints</h3><p>A merge: several "
       "features of the older SAE whose positive combination explains one feature of the "
       "newer (multiple correlation &ge; the threshold, each part adding &ge; the configured "
       "R&sup2;); a split is the reverse. Counts per checkpoint pair (en+ja &rarr; bilingual: "
       "a merge whose parts include an en and a ja feature into a bilingual one):</p>")
  counts = merge_counts(merges, checkpoints)
  h += table_html(counts, list(counts.columns)) if len(counts) else "<p>None found.</p>"
  if len(merges):
    listed = merges.sort_values(["kind", "score"], ascending=[True, False]).head(MERGES_LISTED)
    rows = "".join(
        f"<tr><td>{_fmt(r.hook)}</td><td>{_fmt(r.kind)}</td><td>{_fmt(r.checkpoint_from)}: "
        f"{_card_link(r.checkpoint_from, r.hook, r.features_from)} "
        f"({_fmt(r.languages_from)})</td><td>{_fmt(r.checkpoint_to)}: "
        f"{_card_link(r.checkpoint_to, r.hook, r.feature_to)} ({_fmt(r.language_to)})</td>"
        f"<td>{_fmt(r.score)}</td><td>{_fmt(r.best_single)}</td></tr>"
        for r in listed.itertuples())
    h += (f"<details><summary>{len(merges)} in all (merges.csv): the list, {len(listed)} "
          "shown, the strongest of each kind first, linked to the feature cards</summary>"
          "<table class=\"tbl\"><thead><tr><th>hook</th><th>kind</th><th>from</th>"
          "<th>to</th><th>score (R)</th><th>best single</th></tr></thead><tbody>"
          f"{rows}</tbody></table></details>")
  return h


def overlap_html(overlap, lineage, threshold: float, result=None, tables: dict | None = None
                 ) -> str:
  """The overlap section: the threshold and its calibration, the comparisons beside the seed
  baseline, the nulls, the threshold sweep, merges and splits, births of the final features,
  bilingual ancestry beside its null."""
  if overlap is None or overlap.empty:
    return ""
  tables = tables or {}
  h = f"<h2>Feature overlap (activation correlation &ge; {threshold:.3f})</h2>"
  if result is not None:
    # The false-match rate exists only for a calibrated threshold (None otherwise).
    how = {"fixed": "as configured", "default": "the default (no seed pair to calibrate on)"}
    if result.threshold_source == "calibrated":
      how["calibrated"] = (f"calibrated on the seed pairs: the correlation that at most "
                           f"{result.false_match_rate:.0%} of their features reach against "
                           "shuffled pairings (the seed variant's codes rolled over the tokens)")
    h += f"<p>Threshold {threshold:.3f}: {how[result.threshold_source]}.</p>"
  cal = tables.get("calibration")
  if cal is not None and len(cal):
    h += ("<details><summary>Per seed pair: the threshold it alone gives, its overlap at the "
          f"threshold in use ({len(cal)} pairs)</summary>" + table_html(cal, list(cal.columns)) +
          "</details>")
  h += ("<p>seed_baseline: the overlap of the two seeds at the compared checkpoint "
        "(<i>a</i>); overlap_vs_seed: the overlap as a share of it; overlap_decoder: by "
        "decoder cosine (&ge; 0.5 unless the threshold is fixed).</p>" +
        table_html(overlap, OVERLAP_COLUMNS))
  nulls = tables.get("nulls")
  if nulls is not None and len(nulls):
    h += ("<h3>Nulls</h3><p>random_model: each checkpoint's SAE matched against the SAE of the "
          "randomly initialised model (observed: the same checkpoint against the final one; "
          "for the final one, its seed baseline). token_identity: the overlap that each "
          "feature's token distribution alone predicts (every activation replaced by the "
          "feature's mean on that token), beside the observed overlap of the same pair.</p>" +
          table_html(nulls, list(nulls.columns)))
  sweep = tables.get("thresholds")
  if sweep is not None and len(sweep):
    h += ("<h3>Sensitivity to the threshold</h3><p>The headline numbers at each threshold "
          "(in_use: the one above). overlap_next: mean overlap with the next checkpoint; "
          "born_first: share of the final features whose lineage reaches the first "
          "checkpoint; ancestor_*: the bilingual final features' share with a "
          "language-specific predecessor, and the share expected from the label mix.</p>" +
          table_html(sweep, list(sweep.columns)))
  h += merges_html(tables.get("merges"), result.checkpoints if result is not None else
                   list(dict.fromkeys(overlap[overlap.kind != "seed"].a)))
  if not lineage.empty:
    births = (lineage.groupby(["hook", "birth", "birth_step"], dropna=False).size()
              .reset_index(name="features").sort_values(["hook", "birth_step"]))
    h += "<h3>Births of the final features</h3>" + table_html(births, list(births.columns))
    if "gaps" in lineage:
      h += (f"<p>{int((lineage.gaps > 0).sum())} of {len(lineage)} lineages bridge a weak "
            "link (one checkpoint without a match above the threshold; marked ? in the "
            "chain).</p>")
    bil = lineage[lineage.language == "bilingual"]
    if len(bil):
      share = bil.language_specific_ancestor.mean()
      expected = (f"; the label mix of their predecessors' checkpoints alone predicts "
                  f"{bil.ancestor_expected.mean():.1%}" if "ancestor_expected" in bil else "")
      h += (f"<p>{len(bil)} final bilingual features; {share:.1%} have a language-specific "
            f"predecessor in their lineage{expected}.</p>")
  return h


def _contexts(stats, evalset: EvalSet, feature: int, codes: Codes, row_of: np.ndarray,
              cfg: AnalysisConfig) -> list:
  """Top contexts of one feature: tokens around its maximum with the feature's activations."""
  out = []
  values, indices = codes
  for e in range(min(cfg.contexts_per_feature, stats.ex_val.shape[1])):
    v = stats.ex_val[feature, e]
    if not np.isfinite(v):
      break
    s, t = int(stats.ex_seq[feature, e]), int(stats.ex_pos[feature, e])
    lo, hi = max(0, t - cfg.context_window), min(evalset.ids.shape[1], t + cfg.context_window + 1)
    toks = []
    for j in range(lo, hi):
      r = row_of[s, j]
      if not evalset.attn[s, j]:  # padding
        continue
      a = 0.0
      if r >= 0:
        hit = indices[r] == feature
        a = float(values[r][hit].sum())
      toks.append([clean_token(evalset.token_text[evalset.ids[s, j]]) or
                   evalset.token_text[evalset.ids[s, j]], round(a, 4), j == t])
    out.append({"max": round(float(v), 4), "tokens": toks})
  return out


def _browsed(features, record: SAERecord, n: int, extra=()):
  """The SAE's rows of the features table shown as cards: the sample, then the most frequent;
  and the ``extra`` features (those in a merge or split) whatever their rank."""
  import pandas as pd  # deferred: importing sae_jax does not load pandas
  rows = features[(features.checkpoint == record.checkpoint) & (features.hook == record.hook) &
                  (features.seed == record.seed)]
  chosen = rows[rows.in_sample]
  rest = rows[~rows.in_sample].sort_values("frequency", ascending=False)
  picked = pd.concat([chosen, rest.head(max(n - len(chosen), 0))])
  more = rows[rows.feature.isin(list(extra)) & ~rows.feature.isin(picked.feature)]
  return pd.concat([picked, more])


def _cards(features, saes: list[SAEFeatures], evalset: EvalSet, cfg: AnalysisConfig,
           codes_of: Callable[[SAERecord], Codes], links: dict[str, dict[int, list[Link]]]
           ) -> dict:
  """{SAE key: its feature cards} for the browser (JSON-ready)."""
  row_of = np.full(evalset.ids.shape, -1, np.int64)  # [S, T] -> row of the codes (-1: none)
  row_of[evalset.mask] = np.arange(int(evalset.mask.sum()))
  cards = {}
  for d in saes:
    r, codes = d.record, codes_of(d.record)
    items = [{"f": int(x.feature), "freq": x.frequency, "freq_en": x.frequency_en,
              "freq_ja": x.frequency_ja, "mean": round(x.mean_act, 4),
              "max": round(x.max_act, 4), "entropy": round(x.token_entropy, 3),
              "lang": x.language, "lang_script": x.language_script, "gran_paper":
              x.granularity_paper, "lang_meta": x.language_meta, "lang_truth": x.language_truth,
              "gran": x.granularity, "gran_truth": x.granularity_truth,
              "sample": bool(x.in_sample), "top": d.top_tokens[int(x.feature)],
              "ctx": _contexts(d.stats, evalset, x.feature, codes, row_of, cfg),
              "links": links.get(r.key, {}).get(int(x.feature), [])}
             for x in _browsed(features, r, cfg.browser_features,
                               [f for f, v in links.get(r.key, {}).items()
                                if any(len(l) > 3 and l[3] in ("merge", "split")
                                       for l in v)]).itertuples()]
    cards[r.key] = {"checkpoint": r.checkpoint, "hook": r.hook, "seed": r.seed, "items": items}
  return cards


def _options(labels) -> str:
  return '<option value="">any</option>' + "".join(
      f"<option>{x}</option>" for x in labels if x != "dead")


def write_report(path: Path, title: str, tables: dict, plots: list[str], saes: list[SAEFeatures],
                 evalset: EvalSet, cfg: AnalysisConfig, codes_of: Callable[[SAERecord], Codes],
                 links: dict | None = None, threshold: float = 0.5, overlap=None,
                 found: dict | None = None) -> Path:
  """Write report.html: ``found`` (findings.json: the study's answer) first, then ``tables``
  ({name: DataFrame}: summary, eval, features[, overlap, lineage]), the figures ``plots``
  (names of plots/<name>.png), one card set per SAE."""
  cards = _cards(tables["features"], saes, evalset, cfg, codes_of, links or {})
  fill = {
      "__TITLE__": html.escape(title), "__FINDINGS__": findings_html(found),
      "__SUMMARY__": table_html(tables["summary"],
                                                                 SUMMARY_COLUMNS),
      "__PAPER__": paper_html(tables.get("paper")),
      "__EVAL__": table_html(tables["eval"], ["checkpoint", "hook", "seed"] + list(EVAL_FIELDS)),
      "__OVERLAP__": overlap_html(tables.get("overlap"), tables.get("lineage"), threshold,
                                  overlap, tables),
      "__PLOTS__": "".join(f'<figure><img src="plots/{n}.png" alt="{n}"><figcaption>'
                           f'{n.replace("_", " ")}</figcaption></figure>' for n in plots),
      "__LANG_OPTIONS__": _options(LANGUAGE_LABELS),
      "__GRAN_OPTIONS__": _options(GRANULARITY_LABELS),
      "__DATA__": json.dumps(cards, ensure_ascii=False).replace("</", "<\\/")}
  # One pass: text filled in (token strings, say) is never searched for placeholders.
  page = re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group(0)], _PAGE)
  # Bytes, not atomic_write_text: the page is UTF-8 whatever the locale's encoding.
  store.atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
  return path


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
__FINDINGS__
<h2>Feature populations per checkpoint</h2>__SUMMARY__
__PAPER__
<h2>SAE quality per checkpoint</h2>__EVAL__
<h2>Figures</h2>__PLOTS__
__OVERLAP__
<h2>Feature browser</h2>
<div>checkpoint/hook <select id="sae"></select> language <select id="lang">__LANG_OPTIONS__</select>
granularity <select id="gran">__GRAN_OPTIONS__</select>
<label><input type="checkbox" id="sample">sample only</label>
token <input id="q" size="10"> <span id="count"></span></div>
<div id="browser"><div id="list"></div><div id="card">Choose a feature on the left.</div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
for (const k of Object.keys(DATA)) { const o = document.createElement('option'); o.value = k;
  o.textContent = k; $('sae').appendChild(o); }
function items() {
  const d = DATA[$('sae').value]; if (!d) return [];
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
    div.onclick = () => { location.hash = encodeURIComponent($('sae').value + ':' + it.f); };
    $('list').appendChild(div); }
}
function showCard(it) {
  let h = '<h3 id="card-title">feature ' + it.f + ' <small>(' + esc($('sae').value) + ')</small></h3>';
  h += '<span class="lbl">language: ' + esc(it.lang) + '</span>';
  if (it.lang_script) h += '<span class="lbl">by script: ' + esc(it.lang_script) + '</span>';
  h += '<span class="lbl">by metadata: ' + esc(it.lang_meta) + '</span>';
  if (it.lang_truth) h += '<span class="lbl">truth: ' + esc(it.lang_truth) + '</span>';
  h += '<span class="lbl">granularity: ' + esc(it.gran) + '</span>';
  if (it.gran_paper) h += '<span class="lbl">paper classes: ' + esc(it.gran_paper) + '</span>';
  if (it.gran_truth) h += '<span class="lbl">truth: ' + esc(it.gran_truth) + '</span>';
  h += '<p>firing frequency ' + it.freq.toExponential(2) + ' (en ' +
    it.freq_en.toExponential(2) + ', ja ' + it.freq_ja.toExponential(2) + '), mean ' +
    it.mean + ', max ' +
    it.max + ', token entropy ' + it.entropy + ' nats</p>';
  h += '<p>top tokens: ' + it.top.map(t => esc(t[0]) + ' (' + t[1] + ')').join(', ') + '</p>';
  if (it.links.length) h += '<p>matched: ' + it.links.map(l => '<a href="#" class="link" ' +
    'data-sae="' + esc(l[0]) + '" data-f="' + l[1] + '">' + esc(l[0]) + ' #' + l[1] + '</a> (' +
    (l[3] && l[3] !== 'match' ? esc(l[3]) + ' ' : '') + l[2] + ')').join(', ') + '</p>';
  h += '<h4>top contexts</h4>';
  for (const c of it.ctx) { h += '<div class="ctx">';
    for (const t of c.tokens) { const a = c.max > 0 ? Math.min(t[1] / c.max, 1) : 0;
      h += '<span class="tok' + (t[2] ? ' max' : '') + '" title="' + t[1] +
        '" style="background:rgba(255,140,0,' + a.toFixed(2) + ')">' + esc(t[0]) + '</span> '; }
    h += ' <small>max ' + c.max + '</small></div>'; }
  $('card').innerHTML = h;
  for (const a of document.querySelectorAll('a.link')) a.onclick = e => { e.preventDefault();
    location.hash = encodeURIComponent(a.dataset.sae + ':' + a.dataset.f); };
}
for (const id of ['sae', 'lang', 'gran', 'sample', 'q']) $(id).oninput = renderList;
// A card is linkable: report.html#<checkpoint>/<hook>:<feature> opens it.
function fromHash() {
  const m = decodeURIComponent(location.hash.slice(1)).match(/^(.*):(\\d+)$/);
  if (!m || !DATA[m[1]]) { renderList(); return; }
  $('sae').value = m[1]; renderList();
  const it = DATA[m[1]].items.find(x => x.f == m[2]);
  if (it) showCard(it);
}
window.onhashchange = fromHash;
fromHash();
</script></body></html>
"""
