"""Where files live: local paths and object stores (``gs://``, any fsspec scheme) behind one API.

A local path is a ``pathlib.Path`` (local behaviour is exactly what it always was: temporary
file, fsync, ``os.replace``); a URI is an ``etils.epath.Path``, which reaches ``gs://`` through
fsspec + gcsfs (no TensorFlow). Both have the pathlib methods the package uses (``/``,
``exists``, ``is_dir``, ``iterdir``, ``glob``, ``open``, ``read_text``, ``mkdir``, ``unlink``).

Object stores have no rename: a single object upload is atomic (a reader sees the old object or
the new one), and a directory is complete only once its marker (``COMPLETE``, a manifest) is
written, last. Tensorstore reaches the same bucket through its ``gcs`` driver
(:func:`ts_kvstore`) and Orbax through epath.

An emulator (``STORAGE_EMULATOR_HOST=http://host:port``, which gcsfs reads) is passed on to
tensorstore (``TENSORSTORE_GCS_HTTP_URL``, a test token) by :func:`use_emulator_if_set`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pathlib
import shutil
import socket
import tempfile
from typing import Iterator, Union

from sae_jax.errors import ConfigError

PathLike = Union[str, os.PathLike]
GCS_EXTRA = "pip install 'sae_jax[gcs]' (or: pip install gcsfs)"


def is_remote(path: PathLike) -> bool:
  """Whether ``path`` is a URI (``gs://bucket/...``) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike):
  """A ``pathlib.Path`` for a local path, an ``etils.epath.Path`` for a URI."""
  if isinstance(path, pathlib.Path) or not is_remote(path):
    return pathlib.Path(path)
  use_emulator_if_set()
  _no_listing_cache()
  from etils import epath
  return epath.Path(os.fspath(path))


def use_emulator_if_set() -> None:
  """With ``STORAGE_EMULATOR_HOST`` set (gcsfs's switch), point tensorstore at the same
  endpoint, without credentials, and keep gcsfs off the storage-control API (an emulator has
  none). Settings the user made are kept."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  url = host if "://" in host else f"http://{host}"
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _no_listing_cache() -> None:
  """gcsfs keeps directory listings (and the sizes in them) forever by default: another
  process's new objects, or a grown log, would stay invisible. The run store lists and reads
  what other hosts and earlier runs wrote, so every listing is fresh. (Before the filesystem is
  first made: fsspec applies these defaults then.)"""
  try:
    import fsspec.config
  except ImportError:  # no fsspec: check_location says what is missing
    return
  for proto in ("gs", "gcs"):
    fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)


def ts_kvstore(path: PathLike) -> dict:
  """Tensorstore kvstore spec of a directory: ``file`` locally, ``gcs`` for ``gs://``."""
  s = os.fspath(path)
  if not is_remote(s):
    return {"driver": "file", "path": s}
  scheme, rest = s.split("://", 1)
  if scheme not in ("gs", "gcs"):
    raise ConfigError(f"{s}: tensorstore caches support local paths and gs:// only")
  use_emulator_if_set()
  bucket, _, key = rest.partition("/")
  return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}


def mtime_ns(path: PathLike) -> int:
  """A file's modification time in ns (an object's: its upload time, to the second)."""
  p = as_path(path)
  return p.stat().st_mtime_ns if isinstance(p, pathlib.Path) else int(p.stat().mtime) * 10**9


def rmtree(path: PathLike) -> None:
  """Delete a directory tree if it exists (a prefix's objects on an object store)."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  p = as_path(path)
  if p.exists():
    p.rmtree()


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
  """A local file name holding ``path``'s bytes (for readers that insist on a file name)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="sae_jax_") as tmp:
    local = os.path.join(tmp, as_path(path).name)
    with as_path(path).open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
    yield local


_COPIES: dict[str, str] = {}


def local_dir(path: PathLike) -> pathlib.Path:
  """A local directory with the files of ``path`` (itself when local; a bucket's directory is
  downloaded once per process into a temporary directory removed at exit)."""
  if not is_remote(path):
    return pathlib.Path(path)
  key = os.fspath(path)
  if key not in _COPIES:
    tmp = tempfile.mkdtemp(prefix="sae_jax_model_")
    atexit.register(shutil.rmtree, tmp, True)
    src = as_path(key)
    for f in src.iterdir():
      if not f.is_dir():
        with f.open("rb") as a, open(os.path.join(tmp, f.name), "wb") as b:
          shutil.copyfileobj(a, b, 1 << 20)
    _COPIES[key] = tmp
  return pathlib.Path(_COPIES[key])


def origin(path: PathLike) -> str:
  """The bucket directory a :func:`local_dir` copy was made from (else ``path`` itself): the
  stable name to record (the copy's name changes with every process)."""
  s = os.fspath(path)
  return next((uri for uri, local in _COPIES.items() if local == s), s)


def upload_tree(local_dir: PathLike, dest) -> None:
  """Copy a local directory's files under the remote directory ``dest`` (one object each)."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dest if rel == "." else dest / rel
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as src, (target / name).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


class AppendFile:
  """A text or binary file opened for appending. Locally a real append-mode file; on an object
  store (no appends) the content is held in memory and the whole object rewritten on flush."""

  def __init__(self, path: PathLike, binary: bool = False):
    self.path, self._binary = as_path(path), binary
    self._remote = is_remote(path)
    if not self._remote:
      self._f = open(self.path, "ab" if binary else "a", encoding=None if binary else "utf-8")
      return
    self._parts = []
    if self.path.exists():
      self._parts.append(self.path.read_bytes() if binary else
                         self.path.read_text(encoding="utf-8"))
    self._dirty = True

  def write(self, data) -> None:
    if self._remote:
      self._parts.append(data)
      self._dirty = True
    else:
      self._f.write(data)

  def flush(self) -> None:
    if not self._remote:
      self._f.flush()
    elif self._dirty:
      joined = (b"" if self._binary else "").join(self._parts)
      self._parts = [joined]
      with self.path.open("wb" if self._binary else "w",
                          encoding=None if self._binary else "utf-8") as f:
        f.write(joined)
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._f.close()


def check_location(path: PathLike, what: str = "workdir") -> None:
  """Fail fast (ConfigError, one line) when ``path`` cannot be used: a URI whose filesystem is
  not installed, missing credentials, an endpoint that does not answer, a missing bucket.
  Local paths pass (their errors are the filesystem's own, and immediate)."""
  if not is_remote(path):
    return
  s = os.fspath(path)
  scheme, rest = s.split("://", 1)
  if scheme not in ("gs", "gcs"):
    if importlib.util.find_spec("fsspec") is None:
      raise ConfigError(f"{what} {s}: {scheme}:// needs fsspec and its {scheme} backend")
    return
  use_emulator_if_set()  # before gcsfs is imported: it reads its switches then
  try:
    import gcsfs  # noqa: F401  (fsspec's gs:// backend, which etils.epath uses)
  except ImportError:
    raise ConfigError(f"{what} {s}: gs:// needs the optional dependency gcsfs; {GCS_EXTRA}"
                      ) from None
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if not emulator:
    _check_credentials(what, s)
  _check_reachable(what, s, emulator or "https://storage.googleapis.com")
  bucket = rest.split("/", 1)[0]
  try:
    found = as_path(f"gs://{bucket}").exists()
  except Exception as e:  # auth and transport errors come in many types
    raise ConfigError(f"{what} {s}: {_why(e)}") from None
  if not found:
    raise ConfigError(f"{what} {s}: bucket {bucket!r} does not exist (or is not visible to "
                      "these credentials); create it first")


def _check_credentials(what: str, s: str) -> None:
  import google.auth
  from google.auth.exceptions import DefaultCredentialsError
  try:
    google.auth.default()
  except DefaultCredentialsError as e:
    first = " ".join(str(e).split())[:120]
    raise ConfigError(f"{what} {s}: no Google Cloud credentials ({first}); run `gcloud auth "
                      "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
                      ) from None


def _check_reachable(what: str, s: str, endpoint: str, timeout_s: float = 5.0) -> None:
  """One TCP connection to the storage endpoint (gcsfs would retry for a minute)."""
  url = endpoint if "://" in endpoint else f"http://{endpoint}"
  secure = url.startswith("https")
  hostport = url.split("://", 1)[1].split("/", 1)[0]
  host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
  port = int(port) if port else (443 if secure else 80)
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as e:
    raise ConfigError(f"{what} {s}: the storage endpoint {host}:{port} cannot be reached "
                      f"({e.strerror or type(e).__name__})") from None


def _why(e: BaseException) -> str:
  """One line on why a bucket cannot be used."""
  text = " ".join(str(e).split()) or type(e).__name__
  low = text.lower()
  if "credential" in low or "unauthenticated" in low or "401" in low or "403" in low:
    return (f"no usable credentials ({text[:160]}); run `gcloud auth application-default "
            "login` or set GOOGLE_APPLICATION_CREDENTIALS")
  return f"the bucket cannot be used ({type(e).__name__}: {text[:160]})"
