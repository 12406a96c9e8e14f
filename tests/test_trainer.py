"""The trainer: exact resume after kill -9 / SIGTERM, checkpoint fallback, run store, logs."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.errors import ConfigError

SCRIPT = str(Path(__file__).with_name("trainer_script.py"))


def _start(workdir, out, steps=300):
  return subprocess.Popen([sys.executable, SCRIPT, str(workdir), str(out), str(steps)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoints(workdir):
  state = Path(workdir) / "state"
  return sorted(int(p.name) for p in state.iterdir() if p.name.isdigit()) if state.exists() else []


def _wait_for_checkpoint(proc, workdir, at_least, timeout=120):
  t = time.time()
  while time.time() - t < timeout:
    if any(s >= at_least for s in _checkpoints(workdir)) or proc.poll() is not None:
      return
    time.sleep(0.01)
  raise AssertionError(f"no checkpoint >= {at_least} in {timeout}s")


def _params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run in a subprocess (same environment as the interrupted ones)."""
  d = tmp_path_factory.mktemp("ref")
  proc = _start(d / "run", d / "out.npz")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  return _params(d / "out.npz")


def _assert_identical(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_kill9_at_several_points_then_resume_is_bit_identical(tmp_path, reference):
  workdir, out = tmp_path / "run", tmp_path / "out.npz"
  # Kill right as checkpoints appear (often during the next async write), and once mid-way
  # between checkpoints.
  for at_least, delay in ((40, 0.0), (120, 0.05), (200, 0.0), (260, 0.13)):
    proc = _start(workdir, out)
    _wait_for_checkpoint(proc, workdir, at_least)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "COMPLETE").exists() or proc.returncode == 0
  proc = _start(workdir, out)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  _assert_identical(_params(out), reference)
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 300  # no duplicated records after resumes


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path, reference):
  workdir, out = tmp_path / "run", tmp_path / "out.npz"
  proc = _start(workdir, out)
  _wait_for_checkpoint(proc, workdir, 60)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "Traceback" not in err and "SIGTERM at batch" in err
  stopped_at = max(_checkpoints(workdir))
  assert stopped_at >= 60 and not (workdir / "COMPLETE").exists()
  proc = _start(workdir, out)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  _assert_identical(_params(out), reference)


def _small_run(workdir, steps=12, run=None, **kw):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4096, 16)).astype(np.float32)
  cfg = sj.SAEConfig(architecture="topk", d_in=16, d_sae=128, k=4)
  run = dict(checkpoint_every=3, keep_checkpoints=3, log_every=3, **(run or {}))
  tcfg = sj.TrainConfig(batch_size=128, total_tokens=128 * steps, **kw,
                        optim=sj.OptimConfig(lr=1e-3), run=sj.RunConfig(**run))
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  return sj.train_sae(x, cfg, tcfg, workdir=workdir, mesh=mesh), (x, cfg, tcfg, mesh)


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  ref, _ = _small_run(tmp_path / "ref")
  run = tmp_path / "run"
  _small_run(run)
  # Make it look interrupted after its last checkpoint, then damage that checkpoint.
  shutil.rmtree(run / "sae")
  (run / "COMPLETE").unlink()
  latest = max(_checkpoints(run))
  for f in (run / "state" / str(latest)).rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  sae, _ = _small_run(run)
  assert "cannot be restored" in caplog.text
  assert any(p.name.startswith(f"corrupt_{latest}_") for p in (run / "state").iterdir())
  for k in ref.params:
    np.testing.assert_array_equal(np.asarray(sae.params[k]), np.asarray(ref.params[k]))


def test_finished_run_is_loaded_not_retrained(tmp_path, monkeypatch):
  sae, (x, cfg, tcfg, mesh) = _small_run(tmp_path / "run")
  assert (tmp_path / "run" / "COMPLETE").exists()

  def no_step(*args, **kwargs):
    raise AssertionError("a finished run compiled a train step")

  monkeypatch.setattr("sae_jax.train.jobs.make_train_step", no_step)
  again = sj.train_sae(x, cfg, tcfg, workdir=tmp_path / "run", mesh=mesh)
  for k in sae.params:
    np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(sae.params[k]))
  saved = sj.load_sae(tmp_path / "run" / "sae")
  assert saved.metadata["steps"] == 12 and saved.metadata["tokens_seen"] == 12 * 128


def test_bad_workdirs_are_refused(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    _small_run(f)
  _small_run(tmp_path / "run")
  with pytest.raises(ConfigError, match=r"train.seed: 0 -> 7") as e:
    _small_run(tmp_path / "run", seed=7)
  assert "\n" not in str(e.value)
  _small_run(tmp_path / "run", run=dict(max_nan_batches=5))  # restart-safe: may change
  _, (x, _, tcfg, mesh) = _small_run(tmp_path / "run2")
  other = sj.SAEConfig(architecture="topk", d_in=16, d_sae=128, k=2)
  with pytest.raises(ConfigError, match=r"sae.k: 4 -> 2"):
    sj.train_sae(x, other, tcfg, workdir=tmp_path / "run2", mesh=mesh)
  sae = sj.train_sae(x, other, tcfg, workdir=tmp_path / "run2", mesh=mesh, overwrite=True)
  assert sae.cfg.k == 2 and sj.load_sae(tmp_path / "run2" / "sae").cfg.k == 2


def test_metrics_tensorboard_and_eval_are_written(tmp_path):
  _small_run(tmp_path / "run", eval_tokens=256, run=dict(eval_every=6))
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [r["step"] for r in records if r["split"] == "train"]
  assert train == [3, 6, 9, 12]
  assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12, 12]
  ev = json.loads((tmp_path / "run" / "eval.json").read_text())
  # The held-out rows are the array's last eval_tokens rows; FVU recomputed here in numpy.
  x = np.random.default_rng(1).normal(size=(4096, 16)).astype(np.float32)[-256:]
  x_hat = np.asarray(sj.load_sae(tmp_path / "run" / "sae").reconstruct(x), np.float64)
  fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
  assert ev["fvu"] == pytest.approx(fvu, rel=1e-4) and ev["tokens"] == 256
  assert ev["l0"] == pytest.approx(4.0)
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tmp_path / "run" / "tb"))
  acc.Reload()
  fvu = acc.Scalars("train/fvu")
  assert [e.step for e in fvu] == train
  assert fvu[0].value == pytest.approx(next(r["fvu"] for r in records if r["split"] == "train"))


def test_several_saes_side_by_side_equal_each_trained_alone(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4096, 16)).astype(np.float32)
  tcfg = sj.TrainConfig(batch_size=128, total_tokens=128 * 9, optim=sj.OptimConfig(lr=1e-3),
                        run=sj.RunConfig(checkpoint_every=4, log_every=3))
  cfgs = [sj.SAEConfig(architecture="topk", d_in=16, d_sae=128, k=4),
          sj.SAEConfig(architecture="batchtopk", d_in=16, d_sae=64, k=2)]
  mesh = sj.make_mesh(sj.MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  jobs = [sj.SAEJob(c, tcfg, tmp_path / f"j{i}", name=c.architecture) for i, c in enumerate(cfgs)]
  together = sj.train_saes(x, jobs, mesh)
  for i, c in enumerate(cfgs):
    alone = sj.train_sae(x, c, tcfg, tmp_path / f"alone{i}", mesh)
    for k in alone.params:
      np.testing.assert_array_equal(np.asarray(together[i].params[k]), np.asarray(alone.params[k]))
  with pytest.raises(ConfigError, match="batch_size"):
    sj.train_saes(x, [jobs[0], sj.SAEJob(cfgs[1], tcfg.replace(batch_size=64))], mesh)
