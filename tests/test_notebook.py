"""The Colab quickstart runs top to bottom on its tiny setting."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "experiments" / "colab_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("SAE_JAX_QUICKSTART_DIR", str(tmp_path))
  nb = json.loads(NOTEBOOK.read_text())
  namespace: dict = {}
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(src, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - our own notebook
  out = capsys.readouterr().out
  assert "world entropy" in out and "feature" in out and "Japanese" in out
  assert "shared features (activation correlation" in out
  assert "LlamaForCausalLM is an nnx.Module: True" in out
  assert (tmp_path / "sae_lens" / "cfg.json").exists()
  assert namespace["sae"].metadata["eval"]["fvu"] < 1.0
