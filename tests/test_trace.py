"""The trace: configs, CE-loss-recovered, skip/resume, bad inputs, the CLI."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax import evals
from sae_jax.cli import trace_config_from
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.trace import trace

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("[!_]*.py"))


def _load_config(path, arg):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("arg", ["", "tiny"])
def test_every_shipped_config_loads(path, arg, tmp_path):
  cfg = trace_config_from(_load_config(path, arg), str(tmp_path))
  assert cfg.hooks and cfg.sae.k
  assert sj.TraceConfig.from_json(cfg.to_json()) == cfg


@pytest.fixture
def toy(tiny_toy):
  return tiny_toy


def _cfg(toy, **kw):
  c = _load_config(ROOT / "experiments" / "configs" / "toy.py", "tiny")
  c.model = str(toy)
  c.data.path = str(toy)
  c.train.total_tokens = 12 * 1024
  c.train.run.checkpoint_every = 3
  c.data.max_docs = 1500
  c.seed_baseline = ("final",)  # these tests need one seed baseline, not one per checkpoint
  # One of the suite's eight CPU devices: nothing here is about the mesh (test_device_mix is),
  # and eight-way splits of tiny steps cost more than they spread on two cores.
  c.mesh.devices = 1
  for k, v in kw.items():
    setattr(c, k, v)
  return trace_config_from(c, "unused")


class _Identity:
  def reconstruct(self, x):
    return x


class _Zero:
  def reconstruct(self, x):
    return jnp.zeros_like(x)


def test_ce_loss_recovered_identity_is_one_and_zero_is_zero(toy):
  model = sj.load_model(toy, revision="step30")
  batches = sj.data.token_batches(model, _cfg(toy).data)
  ident = evals.spliced_metrics(model, _Identity(), "resid_post.0", batches, 2)
  zero = evals.spliced_metrics(model, _Zero(), "resid_post.0", batches, 2)
  assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
  assert ident["kl_sae"] == pytest.approx(0.0, abs=1e-6)
  assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
  # ce_clean against a direct computation of the next-token loss.
  b = batches[0], batches[1]
  total, count = 0.0, 0
  for tb in b:
    logits = np.asarray(model.logits(tb.ids, tb.mask), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for r in range(tb.ids.shape[0]):
      for t in range(tb.ids.shape[1] - 1):
        if tb.mask[r, t] and tb.mask[r, t + 1]:
          total -= logp[r, t, tb.ids[r, t + 1]]
          count += 1
  assert ident["ce_clean"] == pytest.approx(total / count, rel=1e-5)


def _params(workdir):
  out = {}
  for p in sorted(Path(workdir).glob("*/*/sae")):
    sae = sj.load_sae(p)
    out[str(p.relative_to(workdir))] = {k: np.asarray(v) for k, v in sae.params.items()}
  return out


@pytest.mark.slow
def test_trace_runs_skips_done_work_and_resumes_exactly(toy, tmp_path, monkeypatch):
  # Two of the four checkpoints: all this test needs (each trace here runs twice) at half the cost.
  cfg = _cfg(toy, revisions=("step3", "step30"))
  rows = trace(cfg, tmp_path / "a")
  assert [r["checkpoint"] for r in rows] == ["step3", "step30"]
  pair = tmp_path / "a" / "step30" / "resid_post.0"
  for f in ("COMPLETE", "eval.json", "sae/cfg.json", "exports/sae_lens/cfg.json",
            "exports/llm_jp_sae/config.json", "metrics.jsonl"):
    assert (pair / f).exists(), f
  ev = json.loads((pair / "eval.json").read_text())
  assert {"fvu", "ce_loss_recovered", "kl_sae", "delta_lm_loss"} <= ev.keys()
  stamp = (pair / "COMPLETE").stat().st_mtime_ns

  def no_model(*args, **kwargs):
    raise AssertionError("a finished trace loaded a model")

  with monkeypatch.context() as m:  # a rerun of a finished trace trains and loads nothing
    # sys.modules: the name sae_jax.trace is the package's trace() function
    m.setattr(sys.modules["sae_jax.trace"], "load_model", no_model)
    assert trace(cfg, tmp_path / "a") == rows
  assert (pair / "COMPLETE").stat().st_mtime_ns == stamp
  # Kill a trace mid-way (while a pair is checkpointed but not complete), rerun, compare.
  script = ("import sys; from sae_jax.trace_config import TraceConfig; from sae_jax.trace import "
            "trace; trace(TraceConfig.from_json(open(sys.argv[1]).read()), sys.argv[2])")
  (tmp_path / "cfg.json").write_text(cfg.to_json())
  proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cfg.json"),
                           str(tmp_path / "b")])
  deadline = time.monotonic() + 300  # a hang guard, not a timing check
  while not list((tmp_path / "b").glob("step3/*/state/*")):
    assert proc.poll() is None, "the trace ended before its first checkpoint"
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail("no checkpoint of step3 appeared")
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "b" / "step30" / "resid_post.0" / "COMPLETE").exists()
  trace(cfg, tmp_path / "b")
  a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
  assert a.keys() == b.keys() and len(a) == 3  # two checkpoints + the seed baseline
  assert "step30/resid_post.0@seed1/sae" in a
  for k in a:
    for name in a[k]:
      np.testing.assert_array_equal(a[k][name], b[k][name], err_msg=f"{k} {name}")


def test_a_bad_hook_is_named_before_the_toy_model_is_trained(tmp_path, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("the toy model was trained before the hook was checked")

  monkeypatch.setattr(sys.modules["sae_jax.trace"], "train_toy_lm", no_training)
  c = _load_config(ROOT / "experiments" / "configs" / "toy.py", "tiny")
  c.hooks = ("resid_post.99",)
  with pytest.raises(ConfigError, match="'resid_post.99' is past the last block: the model "
                                        "has 2 blocks"):
    trace(trace_config_from(c, str(tmp_path)), tmp_path)
  c.hooks = ("resid_mid.0",)
  with pytest.raises(ConfigError, match="unknown hook 'resid_mid.0'"):
    trace(trace_config_from(c, str(tmp_path)), tmp_path)


def test_bad_trace_inputs(toy, tmp_path):
  with pytest.raises(CheckpointError, match="revision 'step77' of"):
    trace(_cfg(toy, revisions=("step0", "step77")), tmp_path / "m")
  rows = trace(_cfg(toy, revisions=("step77", "step0"), missing_revision="skip"),
               tmp_path / "s")
  assert [r["checkpoint"] for r in rows] == ["step0"]
  with pytest.raises(ConfigError, match="past the last block"):
    trace(_cfg(toy, revisions=("step0",), hooks=("resid_post.9",)), tmp_path / "h")
  with pytest.raises(ConfigError, match=r"k=900 must be <= d_sae=512"):  # expansion 8 x 64
    trace(_cfg(toy, revisions=("step0",), sae=dict(k=900)), tmp_path / "k")
  with pytest.raises(ConfigError, match="holds another trace"):
    trace(_cfg(toy, revisions=("step0",), expansion=4), tmp_path / "s")
  assert (tmp_path / "s" / "step0" / "resid_post.0" / "COMPLETE").exists()  # nothing lost


@pytest.mark.parametrize("args, fragment", [
    (["--config=experiments/configs/nope.py"], "nope.py"),
    (["--config.train.batch_size=abc"], "abc"),
    (["--config=experiments/configs/toy.py:tiny", "--config.train.nope=1"],
     "no config field 'nope' to override"),
])
def test_cli_flag_errors_are_one_line_with_status_2(args, fragment, tmp_path):
  proc = subprocess.run([sys.executable, "experiments/trace.py", f"--workdir={tmp_path}"] + args,
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-1000:]
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and fragment in err[0] and "Traceback" not in proc.stderr


def test_cli_library_errors_are_one_line_with_status_2(toy, tmp_path):
  proc = subprocess.run([sys.executable, "experiments/trace.py", f"--workdir={tmp_path}",
                         "--config=experiments/configs/toy.py:tiny", f"--config.model={toy}",
                         "--config.hooks=('resid_post.7',)", f"--config.data.path={toy}",
                         "--config.revisions=('step0',)"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: hook 'resid_post.7' is past the last block" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_warm_start_begins_each_sae_from_the_previous_checkpoints(toy, tmp_path):
  """One short step per SAE: warm-started SAEs stay next to their predecessor; cold ones do
  not (their b_dec is the new checkpoint's geometric median)."""
  kw = dict(revisions=("step10", "step30"), outputs=dict(analyze=False, exports=()))
  ends = {}
  for warm in (True, False):
    cfg = _cfg(toy, warm_start=warm, **kw)
    cfg = cfg.replace(train=cfg.train.replace(
        total_tokens=1024, eval_tokens=0, optim=cfg.train.optim.replace(warmup_steps=100),
        run=cfg.train.run.replace(eval_every=0)))
    trace(cfg, tmp_path / str(warm), log_fn=lambda s: None)
    p = _params(tmp_path / str(warm))
    ends[warm] = {k: np.abs(p["step30/resid_post.0/sae"][k] -
                            p["step10/resid_post.0/sae"][k]).max() for k in ("b_dec", "W_dec")}
  assert ends[True]["b_dec"] < 1e-3 and ends[True]["W_dec"] < 1e-3, ends
  assert ends[False]["b_dec"] > 10 * ends[True]["b_dec"] + 1e-3, ends


def test_collect_activations_then_train_sae_from_the_cache(toy, tmp_path):
  common = ["--config=experiments/configs/toy.py:tiny", f"--config.model={toy}",
            f"--config.data.path={toy}", "--config.data.max_docs=800",
            "--config.train.total_tokens=4096", "--config.mesh.devices=1"]
  run = lambda script, *args: subprocess.run(
      [sys.executable, f"experiments/{script}", *common, *args], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  p = run("collect_activations.py", f"--workdir={tmp_path}", "--revisions=step30")
  assert p.returncode == 0, p.stderr[-2000:]
  cache = tmp_path / "activations" / "step30" / "resid_post.0"
  assert (cache / "meta.json").exists() and list(cache.glob("manifest.*.json"))
  p = run("train_sae.py", f"--workdir={tmp_path / 'sae'}", "--revision=step30",
          f"--cache={cache}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert (tmp_path / "sae" / "COMPLETE").exists() and "done:" in p.stdout
  # The libraries' INFO chatter (Orbax logs every checkpoint) is off by default ...
  chatter = [l for l in p.stderr.splitlines() if l.startswith("I1") or l.startswith("I0")]
  assert chatter == [], chatter[:3]
  assert "step 4/4" in p.stdout  # ... and the progress lines are what remains
  sae = sj.load_sae(tmp_path / "sae" / "sae")
  assert sae.metadata["revision"] == "step30" and sae.metadata["eval"]["fvu"] < 1
  # The cache of another hook is refused in one line.
  p = run("train_sae.py", f"--workdir={tmp_path / 'sae2'}", "--revision=step30",
          "--hook=resid_post.1", f"--cache={cache}")
  assert p.returncode == 2 and "hook: cached 'resid_post.0', asked 'resid_post.1'" in p.stderr
  assert "Traceback" not in p.stderr
