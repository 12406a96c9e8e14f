"""A gs:// workdir against a real GCS JSON API on loopback (gcp-storage-emulator): the trace,
a kill + rerun that resumes, the same SAEs as a local trace, the analysis read back from the
bucket; and the bad-input lines (no gcsfs, unreachable endpoint, missing bucket/credentials)."""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sae_jax as sj
from sae_jax import paths, store
from sae_jax.analysis import AnalysisConfig, analyze
from sae_jax.cli import trace_config_from
from sae_jax.errors import ConfigError
from sae_jax.trace import trace

ROOT = Path(__file__).parents[1]
BUCKET = "sae-jax-test"
HAVE_GCS = all(importlib.util.find_spec(m) for m in ("gcsfs", "gcp_storage_emulator"))
needs_gcs = pytest.mark.skipif(not HAVE_GCS, reason="pip install -e '.[dev]' (gcsfs, "
                               "gcp-storage-emulator)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(port: int, proc, deadline_s: float = 30) -> None:
  end = time.monotonic() + deadline_s
  while time.monotonic() < end:
    assert proc.poll() is None, "the storage emulator exited at start"
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.05)
  pytest.fail("the storage emulator did not open its port")


@pytest.fixture(scope="session")
def gcs_emulator():
  """An in-memory GCS emulator on 127.0.0.1 holding BUCKET; the environment points gcsfs
  (STORAGE_EMULATOR_HOST) and tensorstore (TENSORSTORE_GCS_HTTP_URL) at it. Session-wide:
  fsspec caches its filesystem, endpoint included."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), "start",
                           "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket",
                           BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(port, proc)
  env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
         "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def _cfg(toy):
  spec = importlib.util.spec_from_file_location("toy", ROOT / "experiments/configs/toy.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.model = c.data.path = str(toy)
  c.revisions = ("step10", "step30")
  c.train.total_tokens = 36 * 1024  # room to kill after the first checkpoint, before the end
  c.train.run.checkpoint_every = 6
  c.baseline_seeds = 0  # the seed baseline's resume is test_trace's; here: two SAEs
  c.data.max_docs = 1500
  c.outputs.analyze = False  # analysed below, from the bucket
  c.outputs.analysis_eval_tokens = 2000
  # One CPU device in every trace of this test (not the suite's eight): the same mesh for the
  # local, the killed and the resumed run, and no eight-way split of tiny steps on two cores.
  c.mesh.devices = 1
  return trace_config_from(c, "unused")


def _params(workdir) -> dict:
  return {r.key: {k: np.asarray(v) for k, v in sj.load_sae(r.path / "sae").params.items()}
          for r in store.Store(workdir).saes()}


def _objects(prefix: str) -> list[str]:
  import gcsfs
  fs = gcsfs.GCSFileSystem()
  fs.invalidate_cache()  # a fresh listing every time (the trace writes in another process)
  return fs.find(prefix)


_TRACE = ("import sys; from sae_jax.trace_config import TraceConfig; from sae_jax.trace import "
          "trace; trace(TraceConfig.from_json(open(sys.argv[1]).read()), sys.argv[2], "
          "log_fn=print)")


@needs_gcs
@pytest.mark.slow
def test_a_trace_in_a_bucket_resumes_and_matches_a_local_one(tiny_toy, gcs_emulator, tmp_path):
  cfg = _cfg(tiny_toy)
  run = f"{gcs_emulator}/run"
  (tmp_path / "cfg.json").write_text(cfg.to_json())
  # The uninterrupted local trace first, in this process: it fills the suite's compilation
  # cache (conftest), from which the killed and the resumed run (the suite's XLA flags too) load
  # their programs instead of compiling them again (on two cores, a compile beside another
  # costs as much as one after the other).
  trace(cfg, tmp_path / "local", log_fn=lambda s: None)
  start = lambda log: subprocess.Popen(
      [sys.executable, "-c", _TRACE, str(tmp_path / "cfg.json"), run], cwd=tmp_path,
      stdout=log, stderr=subprocess.STDOUT)
  with open(tmp_path / "killed.log", "w") as b:
    proc = start(b)
    deadline = time.monotonic() + 600  # a hang guard, not a timing check
    # Orbax marks a step in a bucket complete with <step>/commit_success.txt, written after
    # each item's own (no rename there).
    done = lambda: [o for o in _objects(f"{BUCKET}/run/step30/resid_post.0/state")
                    if re.fullmatch(r".*/state/\d+/commit_success\.txt", o)]
    while not done():
      assert proc.poll() is None, "the trace ended before its last SAE's first checkpoint: " + \
          (tmp_path / "killed.log").read_text()[-3000:]
      if time.monotonic() > deadline:
        proc.kill()
        pytest.fail("no checkpoint of step30 appeared in the bucket")
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r.key for r in store.Store(run).saes()] == ["step10/resid_post.0"]  # before the kill
    assert not paths.as_path(f"{run}/step30/resid_post.0/COMPLETE").exists()
  with open(tmp_path / "resumed.log", "w") as c:
    resumed = start(c)  # resumes step30 from its checkpoint in the bucket
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
  log = paths.as_path(f"{run}/trace.log").read_text()
  resumed_at = re.findall(r"resumed at batch (\d+)", log)
  assert len(resumed_at) == 1 and 6 <= int(resumed_at[0]) < 36, resumed_at
  assert [r.key for r in store.Store(run).saes()] == ["step10/resid_post.0",
                                                      "step30/resid_post.0"]
  local, remote = _params(tmp_path / "local"), _params(run)
  assert local.keys() == remote.keys() and len(local) == 2
  for key in local:
    for name in local[key]:
      np.testing.assert_array_equal(local[key][name], remote[key][name], err_msg=f"{key} {name}")
  # The same evaluation too (a resume at the last batch still evaluates on held-out rows).
  assert paths.as_path(f"{run}/summary.csv").read_text() == \
      (tmp_path / "local" / "summary.csv").read_text()
  written = analyze(run, AnalysisConfig(eval_tokens=2000), log_fn=lambda s: None)
  objects = set(_objects(f"{BUCKET}/run/analysis"))
  for name in ("report.html", "features.parquet", "summary.csv", "DONE.json"):
    assert f"{BUCKET}/run/analysis/{name}" in objects, name
  assert "report.html" in written
  assert "\nstep30,30,resid_post.0," in paths.as_path(f"{run}/summary.csv").read_text()
  # Nothing of the bucket's run landed on local disk ("gs:" taken as a relative directory).
  assert not list(tmp_path.glob("gs*")) and not Path("gs:").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "killed.log", "local",
                                                        "resumed.log"]


_CLI = ("import sys; from sae_jax.commands import main; sys.exit(main(['sae-jax'] + "
        "sys.argv[1:]))")
_NO_GCSFS = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "  def find_spec(self, name, path=None, target=None):\n"
             "    if name == 'gcsfs': raise ModuleNotFoundError(\"No module named 'gcsfs'\")\n"
             "sys.meta_path.insert(0, Block())\n" + _CLI.replace("; ", "\n"))


def _bad_input_env(case: str, port: int) -> tuple[str, dict]:
  blank = {"STORAGE_EMULATOR_HOST": "", "TENSORSTORE_GCS_HTTP_URL": "",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": ""}
  if case == "no gcsfs":
    return _NO_GCSFS, {**blank, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
  if case == "unreachable":
    return _CLI, {**blank, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
  return _CLI, {**blank, "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}


CASES = {
    "no gcsfs": "needs the optional dependency gcsfs; pip install 'sae_jax[gcs]'",
    "unreachable": "the storage endpoint 127.0.0.1:",
    "no credentials": "no Google Cloud credentials (File /nonexistent/key.json",
}


@needs_gcs
def test_a_bucket_that_cannot_be_used_is_one_line_and_status_2_before_any_work(tmp_path):
  procs = {}
  for case in CASES:  # side by side: each is a fresh process
    code, env = _bad_input_env(case, _free_port())  # nothing listens on a fresh free port
    blank = [k for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                         "GOOGLE_AUTH_TOKEN_FOR_TESTING") if not env.get(k)]
    full = {k: v for k, v in os.environ.items() if k not in blank}
    full.update({k: v for k, v in env.items() if v})
    (tmp_path / case).mkdir()
    procs[case] = subprocess.Popen(
        [sys.executable, "-c", code, "trace", "--config=toy:tiny",
         "--workdir=gs://no-such-bucket/run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=full, cwd=tmp_path / case)
  t = time.monotonic()
  for case, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (case, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workdir gs://no-such-bucket/run: "), \
        (case, err[-2000:])
    assert CASES[case] in lines[0], (case, lines[0])
    assert not list((tmp_path / case).iterdir())  # nothing written: no toy model, no "gs:" dir
  assert time.monotonic() - t < 120  # said before JAX starts: no minute of retries each


@needs_gcs
def test_a_missing_bucket_is_one_line_and_nothing_is_written(gcs_emulator):
  with pytest.raises(ConfigError, match=r"^workdir gs://no-such-bucket/run: bucket "
                     r"'no-such-bucket' does not exist"):
    trace(_cfg(Path("/nonexistent-model")), "gs://no-such-bucket/run")
  assert not paths.as_path("gs://no-such-bucket").exists()  # not created by a mkdir
