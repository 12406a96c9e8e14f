"""The run store: which SAEs a workdir holds, in which order, and how files are written."""

import json

import pandas as pd
import pytest

from sae_jax import store
from sae_jax.errors import ConfigError


def _run(root, checkpoint, name, complete=True, started=True):
  d = root / checkpoint / name
  d.mkdir(parents=True)
  if started:
    (d / "config.json").write_text("{}")
  if complete:
    (d / store.COMPLETE).write_text("{}")
  return d


def test_saes_are_listed_in_training_order_with_seeds_and_completion(tmp_path):
  model = tmp_path / "model"
  for label, step in (("late", 900), ("early", 5)):  # steps from the toy config, not names
    (model / label).mkdir(parents=True)
    (model / label / "config.json").write_text(json.dumps({"sae_jax_toy": {"step": step}}))
  work = tmp_path / "work"
  _run(work, "late", "resid_post.1")
  _run(work, "late", "resid_post.1@seed2")
  _run(work, "early", "resid_post.1")
  _run(work, "early", "resid_post.0", complete=False)
  _run(work, "step20", "resid_post.1")  # not in the model directory: step from the label
  _run(work, "analysis", "plots")  # reserved names are never checkpoints
  _run(work, "activations", "resid_post.1")
  (work / "early" / "notes").mkdir()  # neither complete nor started: not an SAE
  st = store.Store(work, model)
  got = [(r.checkpoint, r.step, r.hook, r.seed, r.complete) for r in st.saes()]
  assert got == [("early", 5, "resid_post.1", 0, True), ("step20", 20, "resid_post.1", 0, True),
                 ("late", 900, "resid_post.1", 0, True), ("late", 900, "resid_post.1", 2, True)]
  assert st.saes()[-1].key == "late/resid_post.1@seed2"
  assert st.saes()[-1].path == work / "late" / "resid_post.1@seed2"
  partial = [(r.checkpoint, r.hook, r.complete) for r in st.saes(complete_only=False)]
  assert ("early", "resid_post.0", False) in partial and len(partial) == 5
  assert store.local_revisions(model) == ["early", "late"]
  assert st.run("late", "resid_post.1", 2).path == work / "late" / "resid_post.1@seed2"
  assert st.cache("late", "resid_post.1") == work / "activations" / "late" / "resid_post.1"


@pytest.mark.parametrize("name, parsed", [("resid_post.1", ("resid_post.1", 0)),
                                          ("blocks.3.hook_resid_post@seed12",
                                           ("blocks.3.hook_resid_post", 12))])
def test_run_names_round_trip(name, parsed):
  assert store.parse_run_name(name) == parsed
  assert store.run_name(*parsed) == name


@pytest.mark.parametrize("label", ["analysis", "activations", "", "a/b"])
def test_labels_that_cannot_name_a_run_directory_are_refused(tmp_path, label):
  with pytest.raises(ConfigError, match="cannot name a run directory"):
    store.Store(tmp_path).run(label, "resid_post.0")


def test_tables_are_written_whole_as_parquet_and_csv(tmp_path):
  df = pd.DataFrame({"feature": [0, 1, 2], "label": ["en", "ja", "bilingual"]})
  written = store.write_table(df, tmp_path / "out" / "features")
  assert sorted(written) == ["features.csv", "features.parquet"]
  pd.testing.assert_frame_equal(pd.read_parquet(written["features.parquet"]), df)
  pd.testing.assert_frame_equal(pd.read_csv(written["features.csv"]), df)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)  # no temp left


def test_a_failed_write_leaves_the_old_file(tmp_path):
  path = tmp_path / "x.bin"
  path.write_bytes(b"old")

  def fail(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    store.atomic_write_bytes(path, fail)
  assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
  store.atomic_write_text(tmp_path / "t.txt", "日本語")
  assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "日本語"
