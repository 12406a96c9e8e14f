"""The run store: the one owner of the workdir layout, atomic writes, completion markers.

```
<workdir>/trace.json                      the full config of a trace
<workdir>/summary.csv                     one row per (checkpoint, hook) SAE of the trace
<workdir>/trace.log                       the trace's console lines (progress too), appended
<workdir>/analysis/                       what ``sj.analysis.analyze`` writes (reserved name)
<workdir>/activations/<checkpoint>/<hook>/ activation caches (reserved name)
<workdir>/<checkpoint>/<hook>[@seed<n>]/  one SAE: a RunDir (``@seed<n>``: seed-baseline SAE)
    config.json    the SAE + train configs it was started with (a restart must match)
    sae/           the trained SAE (cfg.json + sae.safetensors)
    state/         Orbax train state + data position (resume)
    metrics.jsonl  one JSON object per logged step
    tb/            TensorBoard event files
    eval.json      final evaluation
    COMPLETE       written last; its absence means "not done"
```

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a restarted run) sees the old content or the new, never half of it. A workdir may be
a URI (``gs://bucket/run``, see :mod:`sae_jax.paths`): there each file is one object upload
(atomic by itself, no rename), and COMPLETE, written last, is still what says "done".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sae_jax import paths
from sae_jax.errors import CheckpointError, ConfigError

COMPLETE = "COMPLETE"
# Top-level names of a workdir that are not checkpoints.
RESERVED = ("analysis", "activations")
_SEED_SUFFIX = re.compile(r"^(?P<hook>.+)@seed(?P<seed>\d+)$")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write ``text`` (UTF-8) to ``path`` atomically and durably (synced before the rename)."""

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  atomic_write_bytes(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yield a temporary directory that replaces ``path`` only if the block succeeds.

  On an object store the directory is written locally, the old objects deleted and the files
  uploaded: not atomic as a whole, so a reader trusts it once a later marker says so.
  """
  if paths.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="sae_jax_") as tmp:
      yield Path(tmp)
      paths.rmtree(path)
      paths.upload_tree(tmp, paths.as_path(path))
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
  try:
    yield tmp
    old = None
    if path.exists():
      old = path.with_name(f".{path.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def atomic_write_bytes(path: str | os.PathLike, write: Any, suffix: str = "") -> None:
  """Atomically create ``path`` with ``write(tmp_path)`` (any writer that takes a file name).

  ``suffix`` keeps the extension some writers insist on (``np.savez`` appends ``.npz``). On an
  object store the file is written to a local temporary file and uploaded as one object.
  """
  if paths.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="sae_jax_") as tmp:
      local = os.path.join(tmp, "f.tmp" + suffix)
      write(local)
      with open(local, "rb") as src, paths.as_path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_table(df, stem: str | os.PathLike, formats: tuple[str, ...] = ("parquet", "csv")
                ) -> dict[str, Path]:
  """Write a pandas DataFrame as ``<stem>.parquet`` and ``<stem>.csv``, each atomically.

  Returns {file name: path} of what was written.
  """
  stem = paths.as_path(stem)
  out = {}
  for ext in formats:
    path = stem.with_name(f"{stem.name}.{ext}")
    if ext == "parquet":
      atomic_write_bytes(path, lambda t: df.to_parquet(t, index=False))
    elif ext == "csv":
      atomic_write_bytes(path, lambda t: df.to_csv(t, index=False))
    else:
      raise ConfigError(f"table format {ext!r}; allowed: 'parquet', 'csv'")
    out[path.name] = path
  return out


def read_json(path: str | os.PathLike) -> Any:
  """Parse a JSON file, raising CheckpointError naming the file when it is unreadable."""
  try:
    with paths.as_path(path).open("r", encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None


class RunDir:
  """One SAE's run directory (one checkpoint x hook [x seed] of a trace, or a train_sae run)."""

  def __init__(self, path: str | os.PathLike):
    self.path = paths.as_path(path)
    if self.path.exists() and not self.path.is_dir():
      raise ConfigError(f"workdir {self.path} is a file; pass a directory (it is created if "
                        "missing)")

  sae = property(lambda self: self.path / "sae")
  state = property(lambda self: self.path / "state")
  metrics = property(lambda self: self.path / "metrics.jsonl")
  tensorboard = property(lambda self: self.path / "tb")
  eval = property(lambda self: self.path / "eval.json")
  config = property(lambda self: self.path / "config.json")
  complete_marker = property(lambda self: self.path / COMPLETE)

  def is_complete(self) -> bool:
    return self.complete_marker.exists()

  def mark_complete(self, info: dict | None = None) -> None:
    """Write the COMPLETE marker: the last file of a finished run."""
    atomic_write_json(self.complete_marker, info or {})

  def ensure(self) -> None:
    self.path.mkdir(parents=True, exist_ok=True)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two nested config dicts."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


def run_name(hook: str, seed: int = 0) -> str:
  """Directory name of a hook's SAE: ``resid_post.1``, or ``resid_post.1@seed2`` for the
  seed-baseline SAE trained with init seed + 2."""
  return f"{hook}@seed{seed}" if seed else hook


def parse_run_name(name: str) -> tuple[str, int]:
  """Inverse of :func:`run_name`: (hook, seed)."""
  m = _SEED_SUFFIX.match(name)
  return (m["hook"], int(m["seed"])) if m else (name, 0)


def checkpoint_step(label: str, model_dir: str | os.PathLike | None = None) -> int | None:
  """Training step of a checkpoint: from its ``config.json`` (the toy world records it) when
  ``model_dir/label`` holds one, else the label's trailing number ("step1000", "iter_0001000")."""
  if model_dir is not None:
    config = paths.as_path(model_dir) / label / "config.json"
    if config.is_file():
      info = read_json(config).get("sae_jax_toy", {})
      if "step" in info:
        return int(info["step"])
  m = re.search(r"(\d+)$", label)
  return int(m.group(1)) if m else None


def order_checkpoints(labels, model_dir: str | os.PathLike | None = None) -> list[str]:
  """Checkpoint labels in training order (labels without a step last, by name)."""
  def key(label):
    step = checkpoint_step(label, model_dir)
    return (step is None, step or 0, label)
  return sorted(labels, key=key)


def local_revisions(model_dir: str | os.PathLike) -> list[str]:
  """Revision subdirectories (holding config.json) of a local model directory, in training
  order."""
  model_dir = paths.as_path(model_dir)
  found = [p.name for p in model_dir.iterdir() if p.is_dir() and (p / "config.json").exists()]
  return order_checkpoints(found, model_dir)


@dataclasses.dataclass(frozen=True)
class SAERecord:
  """One SAE directory of a workdir.

  Attributes:
    checkpoint: the checkpoint label (a revision). step: its training step, if known.
    hook: the activation site. seed: 0 for the trace's SAE, n for the seed-baseline SAE
    trained with init seed + n. path: the RunDir's directory. complete: COMPLETE exists.
  """

  checkpoint: str
  step: int | None
  hook: str
  seed: int
  path: Path
  complete: bool

  @property
  def key(self) -> str:
    """``<checkpoint>/<hook>[@seed<n>]``: unique within a workdir."""
    return f"{self.checkpoint}/{run_name(self.hook, self.seed)}"

  @property
  def run(self) -> "RunDir":
    return RunDir(self.path)


class Store:
  """A workdir: where each artifact of a trace lives, and which SAEs it holds.

  ``model_dir``: the traced model's local directory, if any (checkpoint steps are read from
  its revision subdirectories; without it, from the labels).
  """

  def __init__(self, workdir: str | os.PathLike, model_dir: str | os.PathLike | None = None):
    self.path = paths.as_path(workdir)
    if self.path.exists() and not self.path.is_dir():
      raise ConfigError(f"workdir {self.path} is a file; pass a directory (it is created if "
                        "missing)")
    self.model_dir = (paths.as_path(model_dir) if model_dir and paths.as_path(model_dir).is_dir()
                      else None)

  trace_config = property(lambda self: self.path / "trace.json")
  summary = property(lambda self: self.path / "summary.csv")
  log = property(lambda self: self.path / "trace.log")
  analysis = property(lambda self: self.path / "analysis")

  def run(self, checkpoint: str, hook: str, seed: int = 0) -> RunDir:
    """The RunDir of one SAE (it may not exist yet)."""
    _check_label(checkpoint)
    return RunDir(self.path / checkpoint / run_name(hook, seed))

  def cache(self, checkpoint: str, hook: str):
    """Where one hook's activation cache of one checkpoint lives."""
    _check_label(checkpoint)
    return self.path / "activations" / checkpoint / hook

  def step(self, checkpoint: str) -> int | None:
    return checkpoint_step(checkpoint, self.model_dir)

  def saes(self, complete_only: bool = True) -> list[SAERecord]:
    """The SAEs of this workdir in training order (then hook, then seed)."""
    if not self.path.is_dir():
      return []
    out = []
    for ckpt_dir in self.path.iterdir():
      if not ckpt_dir.is_dir() or ckpt_dir.name in RESERVED or ckpt_dir.name.startswith("."):
        continue
      step = self.step(ckpt_dir.name)
      for run_dir in ckpt_dir.iterdir():
        if not run_dir.is_dir() or run_dir.name.startswith("."):
          continue
        complete = (run_dir / COMPLETE).exists()
        # A run directory holds config.json from its start; anything else is not an SAE.
        if not complete and (complete_only or not (run_dir / "config.json").exists()):
          continue
        hook, seed = parse_run_name(run_dir.name)
        out.append(SAERecord(ckpt_dir.name, step, hook, seed, run_dir, complete))
    out.sort(key=lambda r: (r.step is None, r.step or 0, r.checkpoint, r.hook, r.seed))
    return out


def _check_label(checkpoint: str) -> None:
  if checkpoint in RESERVED or not checkpoint or "/" in checkpoint:
    raise ConfigError(f"checkpoint label {checkpoint!r} cannot name a run directory; labels "
                      f"must be non-empty, without '/', and not one of {list(RESERVED)}")
