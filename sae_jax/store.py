"""The run directory: layout, atomic writes, completion markers.

```
<workdir>/trace.json                      the full config of a trace
<workdir>/<checkpoint>/<hook>/            one (checkpoint, hook) pair: a RunDir
    config.json    the SAE + train configs it was started with (a restart must match)
    sae/           the trained SAE (cfg.json + sae.safetensors)
    state/         Orbax train state + data position (resume)
    metrics.jsonl  one JSON object per logged step
    tb/            TensorBoard event files
    eval.json      final evaluation
    COMPLETE       written last; its absence means "not done"
```

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a restarted run) sees the old content or the new, never half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sae_jax.errors import CheckpointError, ConfigError

COMPLETE = "COMPLETE"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write ``text`` to ``path`` atomically (temp file in the same directory, then rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
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


def read_json(path: str | os.PathLike) -> Any:
  """Parse a JSON file, raising CheckpointError naming the file when it is unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None


class RunDir:
  """One training run's directory (a (checkpoint, hook) pair of a trace, or a train_sae run)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if self.path.exists() and not self.path.is_dir():
      raise ConfigError(f"workdir {self.path} is a file; pass a directory (it is created if "
                        "missing)")

  @classmethod
  def for_pair(cls, workdir: str | os.PathLike, checkpoint: str, hook: str) -> "RunDir":
    return cls(Path(workdir) / checkpoint / hook)

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
