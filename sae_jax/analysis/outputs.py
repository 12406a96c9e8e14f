"""Where each file of ``<workdir>/analysis/`` lives; all written atomically through the store.

    features / summary / eval / overlap / lineage .parquet + .csv   the tables (tables.py)
    codes/<checkpoint>/<hook>[@seed<n>].npz   each SAE's top-k codes over the evaluation set
    plots/<name>.png, report.html            figures and the feature browser
    findings.json                            the study's answer (findings.py)
    DONE.json                                what the finished analysis was made of and wrote
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_jax import paths, store
from sae_jax.store import SAERecord

DONE = "DONE.json"
REPORT = "report.html"
FINDINGS = "findings.json"
PLOTS = "plots"


def codes_path(out: Path, record: SAERecord) -> Path:
  """``codes/<checkpoint>/<hook>[@seed<n>].npz`` under ``out``."""
  return out / "codes" / record.checkpoint / f"{store.run_name(record.hook, record.seed)}.npz"


def save_codes(out: Path, record: SAERecord, values: np.ndarray, indices: np.ndarray) -> Path:
  """The SAE's codes (values, indices [N, k]) over the evaluation set's counted tokens."""
  path = codes_path(out, record)
  store.atomic_write_bytes(path, lambda tmp: np.savez(tmp, values=values, indices=indices),
                           suffix=".npz")
  return path


def load_codes(out: Path, record: SAERecord) -> tuple[np.ndarray, np.ndarray]:
  """(values, indices) [N, k] as :func:`save_codes` wrote them."""
  with paths.local_file(codes_path(out, record)) as local, np.load(local, allow_pickle=False) as z:
    return z["values"], z["indices"]


def write_tables(out: Path, frames: dict) -> dict[str, Path]:
  """Every DataFrame of ``frames`` ({name: DataFrame}) as <name>.parquet and <name>.csv;
  returns {file name: path}."""
  written = {}
  for name, df in frames.items():
    written.update(store.write_table(df, out / name))
  return written
