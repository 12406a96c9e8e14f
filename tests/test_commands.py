"""The ``sae-jax`` console command: its entry point, --help, dispatch, and the experiments/
wrappers of the same programs."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sae_jax import commands
from sae_jax.cli import PACKAGED_CONFIGS, packaged_config

ROOT = Path(__file__).parents[1]


def test_the_entry_point_is_declared():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert meta["project"]["scripts"]["sae-jax"] == "sae_jax.commands:main"
  assert "gcsfs" in " ".join(meta["project"]["optional-dependencies"]["gcs"])


def test_help_lists_every_command(capsys):
  assert commands.main(["sae-jax", "--help"]) == 0
  out = capsys.readouterr().out
  for name in ("trace", "analyze", "train-sae", "collect", "plan", "label-examples"):
    assert f"\n  {name} " in out, name


def test_an_unknown_command_is_one_line_and_status_2(capsys):
  assert commands.main(["sae-jax", "trian"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown command 'trian'" in err[0] and "trace" in err[0]


def _run_command(cwd, args: list[str]) -> subprocess.CompletedProcess:
  """``sae-jax <args>`` in a fresh interpreter, run in ``cwd``."""
  code = f"import sys; from sae_jax.commands import main; sys.exit(main(['sae-jax', *{args!r}]))"
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                        timeout=120)


def test_a_command_runs_its_program_with_the_rest_of_the_arguments(tmp_path):
  # A missing required flag: absl's own one line and status 1, from the trace's program.
  proc = _run_command(tmp_path, ["label-examples", "--output=x.csv"])
  assert proc.returncode != 0
  assert "--input" in proc.stderr and "Traceback" not in proc.stderr


def test_a_command_missing_from_the_installation_says_so(capsys, monkeypatch):
  monkeypatch.setitem(commands.COMMANDS, "plan", ("sae_jax.no_such_plan", "x"))
  assert commands.main(["sae-jax", "plan"]) == 2
  assert "sae-jax plan is not available" in capsys.readouterr().err


def test_plan_is_a_packaged_command_outside_a_source_checkout(tmp_path):
  # Run where experiments/ cannot be imported: the command comes from the package alone.
  proc = _run_command(tmp_path, ["plan", "--config=toy:tiny"])
  assert proc.returncode != 0
  assert "--topology" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("arg, expect", [
    ("--config=toy:tiny", f"--config={PACKAGED_CONFIGS}/toy.py:tiny"),
    ("--config=llm_jp_3_1p8b", f"--config={PACKAGED_CONFIGS}/llm_jp_3_1p8b.py"),
    ("--config=experiments/configs/toy.py:tiny", "--config=experiments/configs/toy.py:tiny"),
    ("--config=nope", "--config=nope"),  # not shipped: absl says so
])
def test_a_shipped_config_is_named_without_its_path(arg, expect):
  assert packaged_config(["prog", arg]) == ["prog", expect]


def test_the_experiments_scripts_are_wrappers_of_the_commands():
  for script, module in (("trace", "trace"), ("analyze", "analyze"),
                         ("train_sae", "train_sae"), ("collect_activations", "collect"),
                         ("label_examples", "label_examples")):
    text = (ROOT / "experiments" / f"{script}.py").read_text()
    assert f"from sae_jax.commands.{module} import run" in text
    assert len(text.splitlines()) < 15
