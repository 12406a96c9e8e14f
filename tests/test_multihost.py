"""The multi-host path: several local processes (jax.distributed over gloo) through
launch/local_multiprocess.sh, against one process with the same number of devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sae_jax as sj

ROOT = Path(__file__).parents[1]
LAUNCH = ROOT / "launch"
SCRIPT = Path(__file__).parent / "multihost_script.py"


def _one_process(args, devices=4, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  for k in ("SAE_JAX_COORDINATOR", "SAE_JAX_NUM_PROCESSES", "SAE_JAX_PROCESS_ID"):
    env.pop(k, None)
  return subprocess.run([sys.executable, *args], env=env, timeout=timeout, capture_output=True,
                        text=True, cwd=ROOT)


def _two_processes(args, tmp_path, timeout=300):
  return subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "--processes", "2",
                         "--devices-per-process", "2", "--log-dir", str(tmp_path / "logs"),
                         "--", sys.executable, *args], timeout=timeout, capture_output=True,
                        text=True, cwd=ROOT)


def test_two_processes_train_the_same_sae_as_one(tmp_path):
  """2 processes x 2 devices (a 2x2 mesh spanning both) == 1 process x 4 devices."""
  two = _two_processes([str(SCRIPT), str(tmp_path / "w2"), str(tmp_path / "two.npz")], tmp_path)
  assert two.returncode == 0, two.stderr[-3000:]
  one = _one_process([str(SCRIPT), str(tmp_path / "w1"), str(tmp_path / "one.npz")])
  assert one.returncode == 0, one.stderr[-3000:]
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert int(a["processes"]) == 1 and int(b["processes"]) == 2
  assert int(a["devices"]) == int(b["devices"]) == 4
  for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # One writer: the run files exist once and are whole; the other host wrote no stray files.
  assert (tmp_path / "w2" / "COMPLETE").exists()
  steps = [json.loads(line)["step"] for line in (tmp_path / "w2" / "metrics.jsonl").open()
           if json.loads(line)["split"] == "train"]
  assert steps == sorted(set(steps)) == [10, 20, 30, 40]


def _trace_one_and_two(tiny_toy, tmp_path, *extra: str) -> None:
  """The toy trace (step30, one hook) on a (data=2, model=2) mesh: under the launcher with 2
  processes x 2 devices into tmp_path/two, and 1 process x 4 devices into tmp_path/one."""
  common = ["experiments/trace.py", "--config=experiments/configs/toy.py:tiny",
            f"--config.model={tiny_toy}", f"--config.data.path={tiny_toy}",
            "--config.revisions=('step30',)", "--config.seed_baseline=('none',)",
            "--config.outputs.analyze=False", "--config.outputs.eval_batches=1",
            "--config.mesh.data=2", "--config.mesh.model=2", *extra]
  two = _two_processes(common + [f"--workdir={tmp_path / 'two'}"], tmp_path, timeout=600)
  assert two.returncode == 0, two.stderr[-3000:]
  one = _one_process(common + [f"--workdir={tmp_path / 'one'}"], timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]


@pytest.mark.slow
def test_two_process_trace_gives_the_same_saes_as_one(tiny_toy, tmp_path):
  """The README's entry point under the launcher on a (data=2, model=2) mesh spanning both
  processes, stream mode (activations mixed on the devices, a global stream): the SAEs of one
  process with the same 4 devices, to float rounding (the forward batches differ in size)."""
  _trace_one_and_two(tiny_toy, tmp_path, "--config.data.max_docs=800",
                     "--config.train.total_tokens=8192")
  pa, pb = (tmp_path / w / "step30" / "resid_post.0" for w in ("one", "two"))
  a, b = sj.load_sae(pa / "sae"), sj.load_sae(pb / "sae")
  for k in a.params:
    np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(b.params[k]),
                               rtol=1e-5, atol=1e-5, err_msg=k)
  ea, eb = (json.loads((p / "eval.json").read_text()) for p in (pa, pb))
  assert ea.keys() == eb.keys()
  for k in ("fvu", "ce_sae", "ce_loss_recovered"):
    assert abs(ea[k] - eb[k]) < 1e-4, (k, ea[k], eb[k])
  assert (tmp_path / "two" / "summary.csv").read_text().count("\n") == 2
  # The spliced evaluation ran on the mesh across both processes (no second model copy).
  assert ("spliced evaluation on the {'data': 2, 'model': 2} mesh across 2 processes"
          in (tmp_path / "two" / "trace.log").read_text())


@pytest.mark.slow
def test_two_process_cache_mode_extracts_per_host_and_trains_the_same_sae(tiny_toy, tmp_path):
  """Cache mode on a (data=2, model=2) mesh spanning two processes: each host extracts its own
  batches with the model sharded over its own two devices (no per-host unsharded copy), the
  cache holds the same activations as one process's, and the SAE trained from it is the same."""
  import tensorstore as ts
  _trace_one_and_two(tiny_toy, tmp_path, "--config.extract.activations=cache",
                     "--config.extract.cache_dtype=float32", "--config.data.max_docs=400",
                     "--config.train.total_tokens=4096")
  assert ("each host extracts with the model on its own {'data': 1, 'model': 2} devices"
          in (tmp_path / "two" / "trace.log").read_text())

  def acts(w):
    path = tmp_path / w / "activations" / "step30" / "resid_post.0" / "acts"
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec).result().read().result()
  a, b = acts("one"), acts("two")
  assert a.shape == b.shape and np.abs(a).sum() > 0
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  pa, pb = (tmp_path / w / "step30" / "resid_post.0" for w in ("one", "two"))
  sa, sb = sj.load_sae(pa / "sae"), sj.load_sae(pb / "sae")
  for k in sa.params:
    np.testing.assert_allclose(np.asarray(sa.params[k]), np.asarray(sb.params[k]),
                               rtol=1e-5, atol=1e-5, err_msg=k)


def test_per_host_streams_of_unequal_length_stop_together(tmp_path):
  """Host 0 has 7 local batches of 128 rows, host 1 has 10: both stop after 7, no hang."""
  two = _two_processes([str(SCRIPT), str(tmp_path / "w"), str(tmp_path / "two.npz"), "-1"],
                       tmp_path, timeout=240)
  assert two.returncode == 0, two.stderr[-3000:]
  assert int(np.load(tmp_path / "two.npz")["steps"]) == 7


def test_launchers_dry_run_print_their_commands():
  out = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "--dry-run",
                        "--processes", "3", "--port", "1234", "--", "python", "x.py", "--a=1"],
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 4 and out[-1] == "wait"
  for i, line in enumerate(out[:3]):
    assert f"SAE_JAX_PROCESS_ID={i}" in line and "SAE_JAX_NUM_PROCESSES=3" in line
    assert "SAE_JAX_COORDINATOR=localhost:1234" in line and "python x.py --a=1" in line
  tpu = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--name", "sae-pod",
                        "--zone", "us-central2-b", "--accelerator", "v4-32", "--repo",
                        "https://github.com/example/sae_jax.git", "--",
                        "--config=experiments/configs/llm_jp_3_1p8b.py", "--workdir=/mnt/runs/a"],
                       capture_output=True, text=True, check=True).stdout
  assert "gcloud compute tpus tpu-vm" in tpu and "--worker=all" in tpu and "v4-32" in tpu
  assert "--coordinator=auto" in tpu and "experiments/trace.py" in tpu
  gpu = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "--dry-run", "--nodes", "2", "--",
                        "--workdir=/shared/runs/a"], capture_output=True, text=True,
                       check=True).stdout
  assert "sbatch" in gpu and "--nodes=2" in gpu and "--coordinator=auto" in gpu
  gpu1 = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "--dry-run", "--",
                         "--workdir=/tmp/a"], capture_output=True, text=True, check=True).stdout
  assert "sbatch" not in gpu1 and "experiments/trace.py --workdir=/tmp/a" in gpu1


@pytest.mark.parametrize("script,args,fragment", [
    ("local_multiprocess.sh", ["--processes", "0", "--", "true"], "positive integers"),
    ("local_multiprocess.sh", ["--bogus"], "unknown option '--bogus'"),
    ("local_multiprocess.sh", ["--dry-run"], "no command given"),
    ("tpu_pod.sh", ["--dry-run", "--", "--workdir=/x"], "--name"),
    ("gpu.sh", ["--nodes", "two"], "--nodes=two"),
])
def test_launcher_mistakes_are_one_line_with_status_2(script, args, fragment):
  r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True)
  assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_failing_process_stops_the_others(tmp_path):
  """One process dies: the launcher stops its peer (which would hang in a collective)."""
  code = ("import os, sys, time\n"
          "if os.environ['SAE_JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(60)\n")
  r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "--log-dir",
                      str(tmp_path / "logs"), "--", sys.executable, "-c", code],
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 3 and "stopping the others" in r.stderr


def _pid_of_process(index: int, marker: str) -> int | None:
  """The pid of local process ``index`` of a launcher run whose command line has ``marker``."""
  for d in Path("/proc").iterdir():
    if not d.name.isdigit():
      continue
    try:
      cmd = (d / "cmdline").read_bytes().decode(errors="replace")
      env = (d / "environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
      continue
    if marker in cmd and "multihost_script" in cmd and f"SAE_JAX_PROCESS_ID={index}" in env:
      return int(d.name)
  return None


@pytest.mark.slow
def test_sigterm_to_one_host_stops_all_at_one_batch_and_resumes_exactly(tmp_path):
  """A preemption notice reaching only process 1: both hosts checkpoint the same batch and
  exit 143; the rerun finishes with the SAE of an uninterrupted run."""
  import signal
  import time
  work, steps = tmp_path / "w", "400"
  args = ["bash", str(LAUNCH / "local_multiprocess.sh"), "--processes", "2",
          "--devices-per-process", "2", "--log-dir", str(tmp_path / "logs"), "--",
          sys.executable, str(SCRIPT), str(work), str(tmp_path / "two.npz"), steps]
  out = open(tmp_path / "launcher.log", "w")  # a file, not a pipe: a full pipe would stall it
  launcher = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  while not list((work / "state").glob("[0-9]*")):
    assert launcher.poll() is None, "the run ended before any checkpoint appeared"
    time.sleep(0.05)
  pid = _pid_of_process(1, str(work))
  assert pid is not None
  os.kill(pid, signal.SIGTERM)
  launcher.wait(timeout=300)
  out.close()
  assert launcher.returncode == 143, (tmp_path / "launcher.log").read_text()[-2000:]
  assert not (work / "COMPLETE").exists()
  saved = sorted(int(p.name) for p in (work / "state").glob("[0-9]*"))
  assert saved and saved[-1] < int(steps)
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  ref = _one_process([str(SCRIPT), str(tmp_path / "w1"), str(tmp_path / "one.npz"), steps])
  assert ref.returncode == 0, ref.stderr[-3000:]
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_an_error_on_one_host_ends_the_whole_run_quickly(tmp_path):
  """Process 0 fails while process 1 waits in a collective: the run ends within seconds with
  the error shown (not after JAX's 5-minute shutdown barrier: the timeout would expire)."""
  code = ("from absl import app\n"
          "from sae_jax.cli import run_main\n"
          "from sae_jax import distributed\n"
          "def main(argv):\n"
          "  distributed.initialize()\n"
          "  import jax\n"
          "  from jax.experimental import multihost_utils\n"
          "  if jax.process_index() == 0:\n"
          "    raise RuntimeError('boom on process 0')\n"
          "  multihost_utils.sync_global_devices('never reached by process 0')\n"
          "app.run(run_main(main))\n")
  r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "--log-dir",
                      str(tmp_path / "logs"), "--", sys.executable, "-c", code], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "boom on process 0" in r.stderr
  assert "a process exited with status 1; stopping the others" in r.stderr
