"""The data path: token batches, activation producer, cache, and their bad inputs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sae_jax as sj
from sae_jax.config import DataConfig
from sae_jax.data.activations import ActivationStream, HookRows, batch_rows
from sae_jax.data.cache import CacheReader, finished_batches, write_cache
from sae_jax.data.sources import load_documents
from sae_jax.data.tokens import TokenBatches, tokenize_documents
from sae_jax.errors import CheckpointError, DataError

sys.path.insert(0, str(Path(__file__).parent))
from cache_script import CFG, batches_for  # noqa: E402

SCRIPT = str(Path(__file__).with_name("cache_script.py"))
HOOK = "resid_post.1"


@pytest.fixture
def toy(tiny_toy):
  return tiny_toy


def test_tokens_bos_truncation_packing_and_host_shards(toy):
  model, tb = batches_for(toy, 0, 1)
  bos = model.tokenizer.bos_token_id
  b = tb[0]
  assert (b.ids[:, 0] == bos).all() and b.ids.shape == (16, 24)
  assert (b.pos[b.mask == 1] < 24).all()
  cfg = CFG.replace(path=str(toy))
  tok = tokenize_documents(load_documents(cfg), model.tokenizer, cfg, model.cfg.vocab_size)
  rows = lambda t: {tuple(t[i].doc[r][t[i].mask[r] == 1]) + (t[i].pos[r][0],)
                    for i in range(len(t)) for r in range(16)}
  one = rows(TokenBatches(tok, cfg, 0))
  a, c = rows(TokenBatches(tok, cfg, 0, 0, 2)), rows(TokenBatches(tok, cfg, 0, 1, 2))
  assert not a & c and a | c == one
  packed = TokenBatches(tok, cfg.replace(mode="pack"), 0)
  assert packed[0].mask.all()  # packed rows are full
  assert len(set(packed[0].doc.ravel())) > 16  # and hold several documents per row


def test_metadata_lines_up_with_a_direct_forward(toy):
  model, tb = batches_for(toy, 0, 1)
  stream = ActivationStream(model, tb, [HOOK], buffer_batches=4, seed=0)
  chunk = next(iter(stream))
  cfg = CFG.replace(path=str(toy))
  docs = load_documents(cfg)
  for j in range(0, 40, 7):
    doc, pos, token = int(chunk.doc[j]), int(chunk.pos[j]), int(chunk.token[j])
    ids = model.tokenizer(docs[doc]["text"], return_tensors="np")["input_ids"][:, :24]
    assert ids[0, pos] == token and token not in model.tokenizer.all_special_ids
    direct = np.asarray(model.activations(ids, [HOOK])[HOOK][0, pos])
    np.testing.assert_allclose(chunk.acts[HOOK][j], direct, rtol=1e-4, atol=1e-4)
  # rows_from restarts inside a round and returns exactly the same rows.
  whole = np.concatenate([c.acts[HOOK] for c in stream])
  again = np.concatenate([c.acts[HOOK] for c in stream.rows_from(777)])
  np.testing.assert_array_equal(whole[777:], again)


def test_cache_holds_the_stream_token_for_token(toy, tmp_path):
  model, tb = batches_for(toy, 0, 1)
  write_cache(tmp_path / "c", model, tb, HOOK, "float32")
  reader = CacheReader(tmp_path / "c", expect={"hook": HOOK, "dtype": "float32"})
  special = set(model.tokenizer.all_special_ids)
  for i in (0, 5, len(tb) - 1):
    rows = batch_rows(model, tb[i], [HOOK], special)
    np.testing.assert_array_equal(reader.read_batch(i), rows.acts[HOOK])
    np.testing.assert_array_equal(reader.read_meta("doc", i), rows.doc)
  assert len(reader) == sum(len(batch_rows(model, tb[i], [HOOK], special).token)
                            for i in range(len(tb)))
  with pytest.raises(CheckpointError, match="hook: cached 'resid_post.1', asked 'resid_post.0'"):
    CacheReader(tmp_path / "c", expect={"hook": "resid_post.0"})
  with pytest.raises(CheckpointError, match="dtype"):
    write_cache(tmp_path / "c", model, tb, HOOK, "bfloat16")


def _rows_by_key(path):
  r = CacheReader(path)
  out = {}
  for i in r.done:
    acts, doc, pos = r.read_batch(i), r.read_meta("doc", i), r.read_meta("pos", i)
    out.update({(int(d), int(p)): a for d, p, a in zip(doc, pos, acts)})
  return out


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(toy, tmp_path):
  procs = [subprocess.Popen([sys.executable, SCRIPT, str(toy), str(tmp_path / "two"), str(p),
                             "2"]) for p in (0, 1)]
  assert all(p.wait(timeout=300) == 0 for p in procs)
  assert subprocess.run([sys.executable, SCRIPT, str(toy), str(tmp_path / "one"), "0", "1"],
                        timeout=300).returncode == 0
  one, two = _rows_by_key(tmp_path / "one"), _rows_by_key(tmp_path / "two")
  assert one.keys() == two.keys() and len(one) > 1000
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5)
  # Batch for batch, in the same places: a cache reads back identically whoever wrote it.
  r1, r2 = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
  assert r1.done == r2.done and list(r1.order) == list(r2.order)
  for i in r1.done:
    np.testing.assert_array_equal(r1.read_meta("doc", i), r2.read_meta("doc", i))
    np.testing.assert_allclose(r1.read_batch(i), r2.read_batch(i), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_killed_cache_writer_resumes_to_an_identical_cache(toy, tmp_path):
  ref = tmp_path / "ref"
  assert subprocess.run([sys.executable, SCRIPT, str(toy), str(ref), "0", "1"],
                        timeout=300).returncode == 0
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, SCRIPT, str(toy), str(out), "0", "1"])
  while len(finished_batches(out)) < 5 if out.exists() else True:
    assert proc.poll() is None, "the writer ended before it could be killed mid-cache"
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  with pytest.raises(CheckpointError, match="incomplete"):
    CacheReader(out)
  assert subprocess.run([sys.executable, SCRIPT, str(toy), str(out), "0", "1"],
                        timeout=300).returncode == 0
  a, b = CacheReader(ref), CacheReader(out)
  assert a.done == b.done
  for i in a.done:
    np.testing.assert_array_equal(a.read_batch(i), b.read_batch(i))


@pytest.mark.slow
def test_training_from_cache_matches_training_from_stream(toy, tmp_path):
  model, tb = batches_for(toy, 0, 1)
  write_cache(tmp_path / "c", model, tb, HOOK, "float32")
  cfg = sj.SAEConfig(d_in=model.cfg.d_model, d_sae=256, k=8)
  tcfg = sj.TrainConfig(batch_size=256, total_tokens=256 * 60, eval_tokens=512,
                        optim=sj.OptimConfig(lr=3e-3, warmup_steps=5),
                        run=sj.RunConfig(log_every=1000))
  stream = HookRows(ActivationStream(model, tb, [HOOK], 8, 0), HOOK)
  one = sj.make_mesh(sj.MeshConfig(devices=1))  # the data path is under test, not the mesh
  a = sj.train_sae(stream, cfg, tcfg, mesh=one)
  b = sj.train_sae(CacheReader(tmp_path / "c"), cfg, tcfg, mesh=one)
  # Stated margin: same budget, same model, different token order -> FVU within 0.05.
  assert abs(a.metadata["eval"]["fvu"] - b.metadata["eval"]["fvu"]) < 0.05
  assert a.metadata["eval"]["fvu"] < 0.8


def test_bad_data_inputs_are_one_line_errors(toy, tmp_path):
  model, tb = batches_for(toy, 0, 1)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(DataError, match="no documents|cannot load"):
    load_documents(DataConfig(source="hf", path=str(empty)))
  f = tmp_path / "docs.jsonl"
  f.write_text("".join(json.dumps({"body": f"w{i}"}) + "\n" for i in range(5)))
  with pytest.raises(DataError, match="no text field 'text'"):
    load_documents(DataConfig(source="hf", path=str(f)))
  short = [{"text": ""} for _ in range(4)]
  with pytest.raises(DataError, match="shorter than min_tokens=3"):
    tokenize_documents(short, model.tokenizer, DataConfig(min_tokens=3), model.cfg.vocab_size)
  docs = load_documents(CFG.replace(path=str(toy)))[:10]
  with pytest.raises(DataError, match="vocabulary has 10 entries"):
    tokenize_documents(docs, model.tokenizer, CFG, vocab_size=10)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(DataError, match="cannot write the activation cache"):
    write_cache(blocker / "cache", model, tb, HOOK)
  with pytest.raises(CheckpointError, match="no activation cache"):
    CacheReader(tmp_path / "nothing")


def test_one_forward_feeds_an_sae_per_hook(toy):
  model, tb = batches_for(toy, 0, 1)
  from sae_jax.data.activations import MultiHookRows
  hooks = ["resid_pre.0", "resid_post.1"]
  cfg = lambda: sj.SAEConfig(d_in=model.cfg.d_model, d_sae=128, k=4)
  tcfg = sj.TrainConfig(batch_size=256, total_tokens=256 * 6,
                        optim=sj.OptimConfig(lr=1e-3, warmup_steps=2))
  one = sj.make_mesh(sj.MeshConfig(devices=1))  # the data path is under test, not the mesh
  together = sj.train_saes(MultiHookRows(ActivationStream(model, tb, hooks, 8, 0)),
                           [sj.SAEJob(cfg(), tcfg, hook=h) for h in hooks], mesh=one)
  for h, sae in zip(hooks, together):
    alone = sj.train_sae(HookRows(ActivationStream(model, tb, [h], 8, 0), h), cfg(), tcfg,
                         mesh=one)
    for k in alone.params:
      np.testing.assert_allclose(sae.params[k], alone.params[k], rtol=1e-5, atol=1e-6)


def test_two_sources_mixed_evenly_with_their_languages_and_a_held_out_rest(toy, tmp_path):
  """The paper's data: ja and en Wikipedia from two sources, short documents dropped, 50/50 in
  training and in the held-out evaluation documents after them."""
  model = sj.load_model(toy, revision="step30")
  words = [w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii()][:40]
  ja, en = tmp_path / "ja.jsonl", tmp_path / "en.jsonl"
  # ja: 30 documents, every third one too short; en: 50 documents, all long enough.
  ja.write_text("".join(json.dumps({"text": " ".join([words[i % 40]] * (2 if i % 3 == 0 else 9))})
                        + "\n" for i in range(30)))
  en.write_text("".join(json.dumps({"text": " ".join([words[(i + 7) % 40]] * 9)}) + "\n"
                        for i in range(50)))
  cfg = DataConfig(source="hf", path=(str(ja), str(en)), source_languages=("ja", "en"),
                   balance=True, min_tokens=6, ctx_len=8, max_docs=40, batch_size=4)
  docs = load_documents(cfg)
  assert [d["source"] for d in docs[:6]] == [0, 1, 0, 1, 0, 1] and len(docs) == 40
  assert [d["language"] for d in docs[:2]] == ["ja", "en"]
  tok = tokenize_documents(docs, model.tokenizer, cfg, model.cfg.vocab_size)
  by_source = [sum(d["meta"]["source"] == s for d in tok) for s in (0, 1)]
  assert by_source == [13, 13]  # 20 ja read, 7 of them short: en cut to the same 13
  langs = {int(c) for b in TokenBatches(tok, cfg, 0) for c in b.language[b.mask == 1]}
  assert langs == {0, 1}  # sae_jax.languages: en 0, ja 1
  from sae_jax.analysis.evalset import build_eval_set
  ev = build_eval_set(model, cfg, n_tokens=60)
  held = {model.tokenizer.convert_ids_to_tokens(int(i)) for i in ev.ids[ev.mask]}
  trained = {model.tokenizer.convert_ids_to_tokens(int(i)) for d in tok for i in d["ids"]}
  assert held and not held & trained - {model.tokenizer.bos_token}
  assert set(np.unique(ev.language[ev.mask])) == {0, 1}
  with pytest.raises(sj.errors.ConfigError, match="one language per path"):
    DataConfig(source="hf", path=(str(ja), str(en)), source_languages=("ja",))
