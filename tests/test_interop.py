"""Our exports open in the real SAELens and sparsify and give our reconstructions.

The peers live in their own venv (their dependencies must not touch ours): set
SAE_JAX_PEER_PYTHON to its python. ``.ci/run`` builds that venv and sets it, so CI always runs
these; without it they are skipped locally with that reason.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_formats import inputs, make_sae

PEER = os.environ.get("SAE_JAX_PEER_PYTHON")
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not PEER, reason="SAE_JAX_PEER_PYTHON not set (CI sets it)")]

CASES = [("sae_lens", a, n) for a in ("topk", "batchtopk", "jumprelu", "relu")
         for n in ("none", "unit_norm", "expected_norm")]
CASES += [("sparsify", "topk", n) for n in ("none", "expected_norm")]


def test_real_packages_reproduce_our_reconstructions(tmp_path):
  x = inputs(n=33, seed=5)
  np.save(tmp_path / "x.npy", x)
  jobs, expected = [], {}
  for i, (fmt, arch, normalize) in enumerate(CASES):
    sae = make_sae(arch, normalize, seed=i)
    d = tmp_path / f"{i}_{fmt}_{arch}_{normalize}"
    sae.export(d, format=fmt)
    jobs.append({"format": fmt, "dir": str(d), "x": str(tmp_path / "x.npy"),
                 "out": str(tmp_path / f"{i}.npy")})
    expected[i] = np.asarray(sae.reconstruct(x))
  (tmp_path / "jobs.json").write_text(json.dumps(jobs))
  script = Path(__file__).parent / "interop" / "peer_reconstruct.py"
  proc = subprocess.run([PEER, str(script), str(tmp_path / "jobs.json")], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for i, case in enumerate(CASES):
    got = np.load(tmp_path / f"{i}.npy")
    np.testing.assert_allclose(got, expected[i], rtol=1e-4, atol=1e-4, err_msg=str(case))
