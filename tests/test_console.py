"""The console (one live progress line, permanent lines, the log file) and the path helpers that
put a workdir on local disk or in a bucket."""

import io
import pathlib

import pytest

from sae_jax import console, paths
from sae_jax.errors import ConfigError
from sae_jax.train.actions import progress_line


def test_on_a_terminal_the_progress_line_is_rewritten_in_place():
  out = io.StringIO()
  c = console.Console(out, tty=True)
  c.live("step 1/4")
  c.live("step 2/4")
  c("[1/2] done")  # a permanent line clears the progress line first
  c.live("step 1/4")
  text = out.getvalue()
  assert text == ("\r\x1b[Kstep 1/4" "\r\x1b[Kstep 2/4" "\r\x1b[K[1/2] done\n"
                  "\r\x1b[Kstep 1/4")
  assert text.count("\n") == 1  # one line on the screen for four progress updates


def test_elsewhere_progress_is_a_plain_line_now_and_then(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
  out = io.StringIO()
  c = console.Console(out, tty=False, plain_every_s=30)
  for t in (100, 110, 129, 131, 140):
    now[0] = float(t)
    c.live(f"at {t}")
  c("news")
  now[0] = 141.0
  c.live("after news")  # shown at once: the news line may have pushed progress off screen
  now[0] = 142.0
  c.last("the end")  # a fit's last progress is never dropped
  assert out.getvalue().splitlines() == ["at 100", "at 131", "news", "after news", "the end"]


def test_the_log_file_gets_every_line_progress_included(tmp_path):
  out = io.StringIO()
  tee = console.Tee(console.Console(out, tty=True), tmp_path / "trace.log")
  tee("start")
  console.live(tee)("step 1/2")
  console.live(tee)("step 2/2")
  tee("done")
  tee.close()
  logged = [line.split(" ", 2)[2] for line in (tmp_path / "trace.log").read_text().splitlines()]
  assert logged == ["start", "step 1/2", "step 2/2", "done"]
  assert out.getvalue().count("\n") == 2
  assert console.live(print) is print  # a plain log_fn is its own progress channel


def test_progress_line_shows_steps_rate_fvu_dead_and_eta():
  line = progress_line(40, 400, 0, 1024, 4.0, {"fvu": 0.43125, "dead_fraction": 0.0125,
                                                "l0": 32.0, "loss": 1.0})
  assert line == "step 40/400 10,240 tok/s fvu 0.4313 dead 0.013 l0 32.0 eta 36s"
  assert progress_line(10, 4000, 0, 1024, 1.0, {}).endswith("eta 6m39s")  # 3,990 steps at 10 a second


def test_local_and_bucket_paths():
  assert isinstance(paths.as_path("runs/toy"), pathlib.Path)
  assert not paths.is_remote("/tmp/x") and paths.is_remote("gs://b/run")
  remote = paths.as_path("gs://b/run") / "step0" / "COMPLETE"
  assert str(remote) == "gs://b/run/step0/COMPLETE" and remote.name == "COMPLETE"
  assert paths.ts_kvstore("/tmp/c/acts") == {"driver": "file", "path": "/tmp/c/acts"}
  assert paths.ts_kvstore("gs://b/run/activations/s0/h/acts") == {
      "driver": "gcs", "bucket": "b", "path": "run/activations/s0/h/acts/"}
  with pytest.raises(ConfigError, match="local paths and gs:// only"):
    paths.ts_kvstore("s3://b/x")
  paths.check_location("/any/local/path")  # local paths are the filesystem's business


def test_append_file_appends_locally(tmp_path):
  f = paths.AppendFile(tmp_path / "m.jsonl")
  f.write("a\n")
  f.close()
  f = paths.AppendFile(tmp_path / "m.jsonl")
  f.write("b\n")
  f.flush()
  assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
  f.close()
