"""Documents (text + metadata) from a ``datasets`` dataset, local files, or the toy world."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from sae_jax import paths, store
from sae_jax.config import DataConfig
from sae_jax.errors import DataError
from sae_jax.toy.world import World, WorldConfig

_LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".arrow": "arrow", ".csv": "csv"}


def load_documents(cfg: DataConfig) -> list[dict]:
  """A list of {"text": str, **meta} documents, in the source's order.

  The toy source reads the toy world recorded in ``cfg.path/world.json`` and draws documents
  with ``cfg.seed`` (never the LM's own training draws); each carries its ``language``
  (en / ja / parallel) and its per-token ground truth under ``labels``.
  """
  if cfg.source == "toy":
    docs = _toy(cfg)
  elif len(cfg.paths) == 1:
    docs = _hf(cfg)
  else:
    docs = _mixed(cfg)
  if not docs:
    raise DataError(f"the {cfg.source} dataset {cfg.path or ''!r} (split {cfg.split!r}) has no "
                    "documents")
  return docs


def _toy(cfg: DataConfig) -> list[dict]:
  summary = store.read_json(paths.as_path(cfg.path) / "world.json")
  world = World(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in summary["world"].items()}))
  n = cfg.max_docs or 20_000
  docs = world.documents(n, seed=1000 + cfg.seed)
  return [{"text": d.text, "language": d.doc_type, "labels": {
      "language": d.language, "concept": d.concept, "category": d.category, "form": d.form,
      "pos": d.pos}} for d in docs]


def _mixed(cfg: DataConfig) -> list[dict]:
  """Several sources read side by side: their documents interleaved one from each in turn, so
  any prefix (the first max_docs for training, the rest for evaluation) mixes them evenly.
  Each document records its ``source`` index (and ``language``, when configured)."""
  n = len(cfg.paths)
  per = -(-cfg.max_docs // n) if cfg.max_docs else None
  streams = []
  for i, path in enumerate(cfg.paths):
    docs = _hf(cfg.replace(path=path, max_docs=per, source_languages=()))
    lang = {"language": cfg.source_languages[i]} if cfg.source_languages else {}
    streams.append([{**d, **lang, "source": i} for d in docs])
  mixed = [d for group in itertools.zip_longest(*streams) for d in group if d is not None]
  return mixed[:cfg.max_docs] if cfg.max_docs else mixed


def _hf(cfg: DataConfig) -> list[dict]:
  import datasets
  path = cfg.path
  suffix = Path(path.split("*")[0] if "*" in path else path).suffix
  try:
    if suffix in _LOCAL_FORMATS or (os.path.exists(path) and os.path.isfile(path)):
      fmt = _LOCAL_FORMATS.get(suffix)
      if fmt is None:
        raise DataError(f"cannot tell the format of {path}; use one of {sorted(_LOCAL_FORMATS)}")
      ds = datasets.load_dataset(fmt, data_files=path, split=cfg.split, streaming=cfg.streaming)
    else:
      ds = datasets.load_dataset(path, cfg.name, split=cfg.split, streaming=cfg.streaming)
  except DataError:
    raise
  except Exception as e:
    raise DataError(f"cannot load dataset {path!r} (split {cfg.split!r}): "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    ) from None
  columns = getattr(ds, "column_names", None)
  if columns is not None and cfg.text_field not in columns:
    raise DataError(f"dataset {path!r} has no text field {cfg.text_field!r}; columns: {columns}")
  missing = [f for f in cfg.meta_fields if columns is not None and f not in columns]
  if missing:
    raise DataError(f"dataset {path!r} lacks meta field(s) {missing}; columns: {columns}")
  rows = itertools.islice(iter(ds), cfg.max_docs) if cfg.max_docs else iter(ds)
  out = []
  for row in rows:
    if cfg.text_field not in row:
      raise DataError(f"dataset {path!r} has no text field {cfg.text_field!r}")
    out.append({"text": row[cfg.text_field], **{f: row[f] for f in cfg.meta_fields}})
  return out
