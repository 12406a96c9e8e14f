"""Analysis I: statistics, language and granularity labels on hand-built SAEs, bad inputs, and
the toy trace end to end (ground-truth agreement, report opened in headless Chromium)."""

import ast
import html
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax import store
from sae_jax.analysis import (AnalysisConfig, EvalSet, StatsAccumulator, feature_stats,
                              granularity_labels, language_labels, load_lexicon, script_of)
from sae_jax.errors import ConfigError, DataError
from sae_jax.toy.lm import TINY_WORLD
from sae_jax.toy.world import World

# A little vocabulary: synonyms (dog/hound), a translation (いぬ), a category (cat), a digit.
VOCAB = ["<pad>", "<bos>", "dog", "hound", "いぬ", "cat", "apple", "the", "42", "ねこ", "."]
TOK = {t: i for i, t in enumerate(VOCAB)}
LEXICON = ("# form concept category language\n"
           "dog\tDOG\tanimal\ten\nhound\tDOG\tanimal\ten\nいぬ\tDOG\tanimal\tja\n"
           "cat\tCAT\tanimal\ten\nねこ\tCAT\tanimal\tja\napple\tAPPLE\tfood\ten\n")
# feature -> the tokens it fires on (activation 1.0 each)
FIRES = {0: ["dog"], 1: ["dog", "hound"], 2: ["dog", "いぬ"], 3: ["dog", "cat"], 4: ["いぬ"],
         5: ["42"], 6: []}
EXPECTED = {0: ("en", "token"), 1: ("en", "concept_synonym"),
            2: ("bilingual", "concept_translation"), 3: ("en", "semantic"), 4: ("ja", "token"),
            5: ("ja", "token"), 6: ("dead", "dead")}
LANG = {"dog": 0, "hound": 0, "cat": 0, "apple": 0, "the": 0, "いぬ": 1, "ねこ": 1, "42": 1,
        ".": 3, "<bos>": 4, "<pad>": 4}


def _hand_sae():
  """Encoder = token one-hot selector: feature f fires (1.0) exactly on FIRES[f]."""
  v, m = len(VOCAB), 8
  w_enc = np.zeros((v, m), np.float32)
  for f, toks in FIRES.items():
    for t in toks:
      w_enc[TOK[t], f] = 1.0
  cfg = sj.SAEConfig(architecture="topk", d_in=v, d_sae=m, k=m, normalize="none")
  params = {"W_enc": jnp.asarray(w_enc), "b_enc": jnp.zeros(m), "W_dec": jnp.asarray(w_enc.T),
            "b_dec": jnp.zeros(v)}
  return sj.SAE(cfg, params, {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())})


def _evalset(n_seq=200, t=12, seed=0):
  """Random sequences; '42' always follows 'いぬ' (the digit rule defers to it)."""
  rng = np.random.default_rng(seed)
  words = ["dog", "hound", "いぬ", "cat", "apple", "the", "ねこ", "."]
  ids = np.zeros((n_seq, t), np.int32)
  for s in range(n_seq):
    row = [TOK["<bos>"]]
    while len(row) < t:
      w = words[rng.integers(len(words))]
      row += [TOK[w], TOK["42"]] if w == "いぬ" and rng.random() < 0.5 else [TOK[w]]
    ids[s] = row[:t]
  mask = ids != TOK["<bos>"]
  lang = np.vectorize(lambda i: LANG[VOCAB[i]])(ids).astype(np.int8)
  return EvalSet(ids, mask, np.repeat(np.arange(n_seq)[:, None], t, 1), lang,
                 np.ones_like(mask), list(VOCAB), "test")


def _one_hot(ids):
  return np.eye(len(VOCAB), dtype=np.float32)[ids]


def test_hand_built_features_get_the_expected_labels(tmp_path):
  (tmp_path / "lex.tsv").write_text(LEXICON)
  lex = load_lexicon(tmp_path / "lex.tsv")
  ev = _evalset()
  st, values, indices = feature_stats(_hand_sae(), ev, _one_hot, AnalysisConfig(seqs_per_batch=32))
  assert values.shape == (ev.n_tokens, 8)
  # Statistics against a direct count.
  flat = ev.ids[ev.mask]
  for f, toks in FIRES.items():
    assert st.count[f] == np.isin(flat, [TOK[t] for t in toks]).sum()
    if toks:
      assert st.act_max[f] == 1.0
      ids_, counts = st.token_counts(f)
      assert set(ids_.tolist()) == {TOK[t] for t in toks}
  lang = language_labels(st, ev.ids, ev.token_text, ev.language)
  gran = granularity_labels(st, ev.ids, ev.token_text, lex)
  for f, (want_lang, want_gran) in EXPECTED.items():
    assert lang["language"][f] == want_lang, (f, lang["language"][f])
    assert gran["granularity"][f] == want_gran, (f, gran["granularity"][f])
    assert lang["language_truth"][f] == want_lang, f
  # Without a lexicon only token vs multi-token is claimed.
  plain = granularity_labels(st, ev.ids, ev.token_text, None)["granularity"]
  assert [plain[f] for f in range(6)] == ["token", "multi_token", "multi_token", "multi_token",
                                          "token", "token"]


def test_examples_are_a_sample_of_strong_sequences_each_once():
  ev = _evalset(n_seq=300)
  st, _, _ = feature_stats(_hand_sae(), ev, _one_hot, AnalysisConfig(n_examples=50))
  mask, seq, pos = st.examples(0.7)
  for f in range(6):
    s = seq[f][mask[f]]
    assert len(s) == 50 and len(set(s.tolist())) == 50  # 50 distinct sequences
    assert all(VOCAB[ev.ids[a, b]] in FIRES[f] for a, b in zip(s, pos[f][mask[f]]))
  # The strongest-sequence table is filled too (top contexts in the browser).
  assert np.isfinite(st.ex_val[:6]).all() and not np.isfinite(st.ex_val[6]).any()


def test_stats_accumulator_merges_like_one_pass():
  """Small merge thresholds (many merges) give the same statistics as one big merge."""
  rng = np.random.default_rng(1)
  n, k, m, v = 3000, 4, 64, 50
  vals = rng.random((n, k)).astype(np.float32) * (rng.random((n, k)) > 0.2)
  idx = rng.integers(0, m, (n, k))
  tok, seq = rng.integers(0, v, n), np.arange(n) // 10
  pos, lang = (np.arange(n) % 10).astype(np.int32), rng.integers(0, 2, n)
  outs = []
  for merge_every in (10**9, 97):
    acc = StatsAccumulator(m, v, n_examples=5, merge_every=merge_every)
    for lo in range(0, n, 250):
      sl = slice(lo, lo + 250)
      acc.add(vals[sl], idx[sl], tok[sl], seq[sl], pos[sl], lang[sl])
    outs.append(acc.finish())
  a, b = outs
  for name in ("count", "act_sum", "act_max", "lang_count", "token_keys", "token_key_counts",
               "ex_val", "ex_seq"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, err_msg=name)
  # Direct check of the per-feature maxima and one feature's top sequences.
  fire = vals > 0
  want_max = np.zeros(m, np.float32)
  np.maximum.at(want_max, idx[fire], vals[fire])
  np.testing.assert_array_equal(a.act_max, want_max)


def test_scripts():
  assert [script_of(t) for t in ["dog", "\u2581Tokyo", "いぬ", "東京", "カタカナ", "42", ".", ""]
          ] == ["en", "en", "ja", "ja", "ja", "digit", "none", "none"]


def test_malformed_lexicon_line_is_named(tmp_path):
  p = tmp_path / "lex.tsv"
  p.write_text("dog\tDOG\tanimal\nhound DOG animal\n")
  with pytest.raises(DataError, match=r"line 2 is malformed"):
    load_lexicon(p)
  with pytest.raises(ConfigError, match="does not exist"):
    load_lexicon(tmp_path / "nope.tsv")


def _fake_store(tmp_path, d_ins):
  cfg = sj.TraceConfig(model=str(tmp_path / "no_model"), hooks=("resid_post.0",))
  (tmp_path / "trace.json").write_text(cfg.to_json())
  for rev, d in zip(("step1", "step2"), d_ins):
    run = store.Store(tmp_path).run(rev, "resid_post.0")
    sae_cfg = sj.SAEConfig(architecture="topk", d_in=d, d_sae=16, k=2, normalize="none")
    params = {"W_enc": jnp.zeros((d, 16)), "b_enc": jnp.zeros(16), "W_dec": jnp.zeros((16, d)),
              "b_dec": jnp.zeros(d)}
    sj.SAE(sae_cfg, params, {"norm_scale": jnp.ones(()), "threshold": jnp.zeros(())}).save(
        run.sae)
    run.mark_complete()


def test_bad_workdirs_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match="trace.json missing"):
    sj.analysis.analyze(tmp_path)
  cfg = sj.TraceConfig(model="x", hooks=("resid_post.0",))
  (tmp_path / "trace.json").write_text(cfg.to_json())
  (tmp_path / "step1" / "resid_post.0").mkdir(parents=True)  # started, never completed
  with pytest.raises(DataError, match="no complete SAEs"):
    sj.analysis.analyze(tmp_path)
  other = tmp_path / "mixed"
  other.mkdir()
  _fake_store(other, (8, 12))
  assert [r.key for r in store.Store(other).saes()] == ["step1/resid_post.0",
                                                        "step2/resid_post.0"]
  with pytest.raises(DataError, match=r"hook resid_post.0 differ in d_in: step1/resid_post.0 "
                                      r"has 8, step2/resid_post.0 has 12"):
    sj.analysis.analyze(other)


def _chromium(*args, timeout=90):
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  assert exe, ("headless Chromium is required for the report test: apt-get install chromium "
               "(.ci/run installs it)")
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"]
  return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_toy_trace_analysis_end_to_end(tiny_toy, tmp_path):
  """Tiny toy trace -> the trace runs the analysis -> tables, agreement, overlap, report."""
  from sae_jax.cli import trace_config_from
  from sae_jax.trace import trace
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "toy_config", Path(__file__).parents[1] / "experiments" / "configs" / "toy.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.model = c.data.path = str(tiny_toy)
  c.revisions = ("step0", "step10", "step30")
  c.mesh.devices = 1  # one of the suite's eight CPU devices: the analysis is under test here
  cfg = trace_config_from(c, "unused")
  work = tmp_path / "run"
  trace(cfg, work, log_fn=lambda s: None)
  out = work / "analysis"
  for f in ("features.parquet", "features.csv", "summary.parquet", "summary.csv", "eval.csv",
            "overlap.csv", "lineage.csv", "report.html", "plots/language_composition.png",
            "plots/granularity_composition.png", "plots/firing_frequency.png",
            "plots/eval_metrics.png", "plots/overlap.png", "plots/lineage.png", "merges.csv",
            "nulls.csv", "thresholds.csv", "calibration.csv"):
    assert (out / f).exists(), f
  import pandas as pd
  summary = pd.read_csv(out / "summary.csv")
  final = summary[(summary.checkpoint == "step30") & (summary.seed == 0)].iloc[0]
  # The summary against the features table it summarises.
  feats = pd.read_parquet(out / "features.parquet")
  feats_final = feats[(feats.checkpoint == "step30") & (feats.seed == 0)]
  # The script rule over the strong-firing examples recovers the toy world's per-token truth
  # where script is language: on the features none of whose top tokens is written alike in
  # both languages (digits, names, loanwords). Overall it agrees less (0.90 on this trace):
  # the shared tokens are there so that it can be wrong. The paper's rule reads the strongest
  # token of examples collected as the authors' code does (pre-activations on every token, so
  # the strongest may be one where the feature does not fire): a property of its procedure.
  shared = World(TINY_WORLD).shared_forms
  tops = feats_final.top_tokens.str.split("; ").map(lambda ts: {t.rsplit(" (", 1)[0] for t in ts})
  plain = feats_final[~tops.map(lambda ts: bool(ts & shared))]
  assert len(plain) > 0.5 * len(feats_final)
  assert (plain.language_script == plain.language_truth).mean() >= 0.95
  assert final.agreement_language_script == pytest.approx(
      (feats_final.language_script == feats_final.language_truth).mean(), abs=1e-12)
  assert len(feats_final) == final.n_live and feats_final.in_sample.sum() == final.sample_size
  assert final.sample_size == min(100, final.n_live)
  assert final.agreement_language == pytest.approx(
      (feats_final.language == feats_final.language_truth).mean(), abs=1e-12)
  assert final.agreement_granularity == pytest.approx(
      (feats_final.granularity == feats_final.granularity_truth).mean(), abs=1e-12)
  for x in ("en", "ja", "bilingual", "none"):
    assert final[f"share_lang_{x}"] == pytest.approx((feats_final.language == x).mean(),
                                                     abs=1e-12), x
  ja_only = feats_final[feats_final.language_truth == "ja"]
  assert len(ja_only) and (ja_only.frequency_ja > ja_only.frequency_en).mean() > 0.9
  _check_paper_table(out, feats)
  _check_findings(out, feats)
  _check_overlap_and_lineage(out, work, feats, final)
  _check_report_in_chromium(out, feats_final, tmp_path)


def _check_findings(out, feats):
  """findings.json: every checkpoint's shares (from the features table) with intervals around
  them, FVU, dead fraction, the model-level truth, and the three verdicts."""
  import json
  found = json.loads((out / "findings.json").read_text())
  assert [e["checkpoint"] for e in found["checkpoints"]] == ["step0", "step10", "step30"]
  assert [e["control"] for e in found["checkpoints"]] == [True, False, False]
  for e in found["checkpoints"]:
    rows = feats[(feats.checkpoint == e["checkpoint"]) & (feats.seed == 0)]
    labelled = rows[~rows.language.isin(["none"])]
    for x in ("en", "ja", "bilingual"):
      share, lo, hi = e["language_shares"][x]
      assert share == pytest.approx((labelled.language == x).mean()) and lo <= share <= hi
    assert set(e["granularity_shares"]) == {"token", "concept_synonym", "concept_semantic",
                                            "uninterpretable"}
    assert 0 <= e["fvu"] < 1 and 0 <= e["dead_fraction"] <= 1
    lo, hi = e["model_alignment_ci"]
    assert -1 <= lo <= e["model_alignment"] <= hi <= 1 and 0 <= e["probe_accuracy"] <= 1
  assert set(found["verdicts"]) == {"language_specific_first", "token_level_first",
                                    "sae_follows_model"}
  for v in found["verdicts"].values():
    assert v["answer"] in (True, False, None)
  assert found["verdicts"]["language_specific_first"]["first"] == "step10"
  page = (out / "report.html").read_text(encoding="utf-8")
  assert page.index("Findings (findings.json)") < page.index("Feature populations")


def _check_paper_table(out, feats):
  """paper.csv against the features table: both language rules, the four classes and their
  Wilson intervals around the shares."""
  import pandas as pd
  paper = pd.read_csv(out / "paper.csv")
  assert len(paper) == len(feats.groupby(["checkpoint", "hook", "seed"]))
  for r in paper.itertuples():
    rows = feats[(feats.checkpoint == r.checkpoint) & (feats.hook == r.hook) &
                 (feats.seed == r.seed)]
    assert r.n_live == len(rows)
    for x in ("en", "ja", "bilingual"):
      assert getattr(r, f"n_paper_{x}") == (rows.language == x).sum()
      assert getattr(r, f"n_script_{x}") == (rows.language_script == x).sum()
    assert r.n_paper_en + r.n_paper_ja + r.n_paper_bilingual + r.n_paper_none == r.n_live
    # The paper decides every example (up to 50); a feature without examples is not labelled.
    n_ex = rows.n_en + rows.n_ja
    assert ((n_ex >= 0) & (n_ex <= 50)).all() and (n_ex > 0).any()
    assert ((n_ex == 0) == (rows.language == "none")).all()
    assert ((n_ex == 0) == (rows.granularity_paper == "none")).all()
    assert r.n_labelled == (n_ex > 0).sum() == r.n_live - r.n_paper_none
    for g in ("token", "concept_synonym", "concept_semantic", "uninterpretable"):
      k = getattr(r, f"n_{g}")
      assert k == (rows.granularity_paper == g).sum()
      assert getattr(r, f"{g}_lo") <= k / r.n_labelled <= getattr(r, f"{g}_hi")
  html_text = (out / "report.html").read_text(encoding="utf-8")
  assert "the paper&#x27;s rule beside the script variant" in html_text or (
      "the paper's rule beside the script variant" in html_text)
  assert "Wilson 95 % interval" in html_text


def _check_overlap_and_lineage(out, work, feats, final):
  """overlap.csv's mean best correlation against dense correlations of the saved codes;
  lineage.csv's chains against its births."""
  import pandas as pd
  overlap = pd.read_csv(out / "overlap.csv")
  assert set(overlap.kind) == {"seed", "next", "final"}
  order = ["step0", "step10", "step30"]
  for ckpt in order:  # the toy config's seed baseline is at every checkpoint
    assert (work / ckpt / "resid_post.0@seed1" / "COMPLETE").exists()
  assert list(overlap[overlap.kind == "seed"].a) == order
  seed = overlap[overlap.kind == "seed"].set_index("a").overlap
  rows = overlap[overlap.kind != "seed"]
  np.testing.assert_allclose(rows.seed_baseline, seed[rows.a].to_numpy())
  np.testing.assert_allclose(rows.overlap_vs_seed, rows.overlap / rows.seed_baseline)
  sweep = pd.read_csv(out / "thresholds.csv")
  threshold = float(sweep[sweep.in_use].threshold.iloc[0])
  assert 0 < threshold < 1
  nulls = pd.read_csv(out / "nulls.csv")
  assert set(nulls.null) == {"random_model", "token_identity"}
  assert set(nulls[nulls.null == "random_model"].compared_to) == {"step0"}
  merges = pd.read_csv(out / "merges.csv")
  assert list(merges.columns[:8]) == ["hook", "checkpoint_from", "checkpoint_to", "kind",
                                      "feature_to", "features_from", "languages_from",
                                      "language_to"]
  assert set(merges.kind) <= {"merge", "split"}
  min_firings = 5
  row = overlap[(overlap.kind == "next") & (overlap.a == "step10")].iloc[0]
  assert row.b == "step30"
  dense = []
  for ckpt in ("step10", "step30"):
    with np.load(out / "codes" / ckpt / "resid_post.0.npz") as z:
      v, i = z["values"], z["indices"]
    m = int(i.max()) + 1
    d = np.zeros((v.shape[0], m))
    np.add.at(d, (np.repeat(np.arange(v.shape[0]), v.shape[1]), i.ravel()),
              np.maximum(v.ravel(), 0))
    d[:, (d > 0).sum(0) < min_firings] = 0  # rare features are not matched
    dense.append(d)
  with np.errstate(invalid="ignore", divide="ignore"):
    corr = np.corrcoef(dense[0].T, dense[1].T)[:dense[0].shape[1], dense[0].shape[1]:]
  live = np.sort(feats[(feats.checkpoint == "step10") & (feats.seed == 0)].feature.to_numpy())
  live = live[(dense[0][:, live] > 0).sum(0) >= min_firings]
  best = np.nanmax(np.nan_to_num(corr[live], nan=-np.inf), axis=1)
  assert row.mean_best == pytest.approx(best.mean(), abs=1e-5)
  # One-to-one matches are a subset of features whose best partner clears the threshold.
  assert row.overlap <= (best >= threshold).mean() + 1e-12
  lineage = pd.read_csv(out / "lineage.csv")
  eligible = (dense[1][:, feats_final_ids(feats)] > 0).sum(0) >= min_firings
  assert len(lineage) == eligible.sum() <= final.n_live
  for r in lineage.itertuples():
    chain = r.chain.split(" <- ")
    assert int(chain[0]) == r.feature and len(chain) == r.chain_length
    assert r.birth == order[-r.chain_length]


def feats_final_ids(feats):
  return np.sort(feats[(feats.checkpoint == "step30") & (feats.seed == 0)].feature.to_numpy())


def _check_report_in_chromium(out, feats_final, tmp_path):
  """The report in a real browser: the tables render, a linked feature card opens with that
  feature's labels, top tokens and top contexts (the max token highlighted)."""
  f = feats_final.iloc[0]
  url = (out / "report.html").as_uri() + f"#step30%2Fresid_post.0%3A{int(f.feature)}"
  dom = _chromium("--user-data-dir=" + str(tmp_path / "chrome"), "--virtual-time-budget=3000",
                  "--dump-dom", url)
  assert dom.returncode == 0, dom.stderr[-2000:]
  assert "Feature populations per checkpoint" in dom.stdout and "<td>step30</td>" in dom.stdout
  assert f'id="card-title">feature {int(f.feature)} ' in dom.stdout
  assert f'<span class="lbl">language: {f.language}</span>' in dom.stdout
  first_token = f.top_tokens.split("; ")[0].rsplit(" (", 1)[0]
  assert f"top tokens: {html.escape(first_token, quote=False)} (" in dom.stdout
  assert 'class="ctx"' in dom.stdout and 'class="tok max"' in dom.stdout
  shot = tmp_path / "report.png"
  # Tall enough for the browser below the overlap section's tables.
  r = _chromium("--user-data-dir=" + str(tmp_path / "chrome2"), "--window-size=1300,6000",
                f"--screenshot={shot}", url)
  assert r.returncode == 0, r.stderr[-2000:]
  from PIL import Image
  pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
  # The strongest token of each context is drawn on full orange (rgba(255,140,0,1.00)).
  assert ((pixels == (255, 140, 0)).all(1)).sum() > 50


def test_eval_set_of_a_text_source_is_the_documents_after_training(tiny_toy, tmp_path):
  """Training reads the first max_docs documents; the evaluation set takes the ones after."""
  import json as _json
  from sae_jax.analysis import build_eval_set
  model = sj.load_model(tiny_toy, revision="step30")
  words = [w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii()][:30]
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(_json.dumps({"text": " ".join([w] * 6)}) + "\n" for w in words))
  cfg = sj.DataConfig(source="hf", path=str(docs), max_docs=20, ctx_len=8, batch_size=4)
  ev = build_eval_set(model, cfg, n_tokens=40)
  seen = {model.tokenizer.convert_ids_to_tokens(int(i)) for i in ev.ids[ev.mask]}
  assert seen and seen <= set(words[20:]), seen


def test_analysis_modules_stand_alone():
  """The analysis needs only the run store (nothing of the trainer or the trace), imports
  sae_jax modules at module level, and no module reaches for another's private names."""
  for path in sorted((Path(sj.analysis.__file__).parent).glob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_jax"):
        assert node.module != "sae_jax.trace", path.name
        assert not (node.module + ".").startswith("sae_jax.train."), path.name
        assert not {a.name for a in node.names} & {"trace", "train"}, path.name
        assert not any(a.name.startswith("_") for a in node.names), (path.name, node.module)
      if isinstance(node, ast.FunctionDef):
        for inner in ast.walk(node):
          if isinstance(inner, ast.ImportFrom):
            assert not (inner.module or "").startswith("sae_jax"), (path.name, node.name)
          if isinstance(inner, ast.Import):
            assert not any(a.name.startswith("sae_jax") for a in inner.names), path.name
