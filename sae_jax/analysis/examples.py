"""A feature's examples, as the paper records them: token pieces and quantised activations.

``read_examples`` reads the authors' released demo format (one JSON object a line, ``.gz``:
gzip): ``{"feature", "examples": [{"tokens", "acts"}], ["language_counts", "granularity"]}``.
The labels (paper.py, granularity.py, labels.py) are pure functions of these examples, so the
same code labels our features and anyone's.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
from pathlib import Path
from typing import Sequence

from sae_jax import paths
from sae_jax.errors import DataError

MAX_QUANT = 10  # the paper's quantisation: integers 0-10, 10 = the feature's maximum


@dataclasses.dataclass(frozen=True)
class Example:
  """One example sequence of a feature: its token pieces (SentencePiece's marker written as a
  space, as the paper does) and the feature's quantised activation on each (0-10)."""

  tokens: tuple[str, ...]
  acts: tuple[int, ...]

  def __post_init__(self):
    if len(self.tokens) != len(self.acts):
      raise DataError(f"an example has {len(self.tokens)} tokens but {len(self.acts)} "
                      "activations")

  @property
  def strongest(self) -> int:
    """The first position with the highest value (the paper's ``max(range(n), key=...)``)."""
    return strongest_position(self.acts)


@dataclasses.dataclass(frozen=True)
class FeatureExamples:
  """A feature's id and examples (and, when read from the authors' files, their labels)."""

  feature: int
  examples: tuple[Example, ...]
  reference_counts: tuple[int, int] | None = None  # the authors' (en, ja) counts
  reference_granularity: str | None = None  # the authors' hand label


def strongest_position(acts: Sequence[float]) -> int:
  """Index of the first maximum of ``acts`` (-1 for an empty sequence)."""
  acts = list(acts)
  return acts.index(max(acts)) if acts else -1


def quantise(values: Sequence[float], max_act: float) -> tuple[int, ...]:
  """The paper's integer activations: 0 where ``a <= 0``, else ``ceil(10 * a / max_act)``."""
  if not max_act > 0:
    return tuple(0 for _ in values)
  return tuple(0 if not a > 0 else int(math.ceil(float(a) * MAX_QUANT / max_act))
               for a in values)


# The authors' hand labels (their files: 4 token, 3 synonymy, 2 semantic, 1 uninterpretable).
HAND_GRANULARITY = {4: "token", 3: "concept_synonym", 2: "concept_semantic",
                    1: "uninterpretable"}


def _example(obj, where: str) -> Example:
  try:
    return Example(tuple(str(t) for t in obj["tokens"]), tuple(int(a) for a in obj["acts"]))
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: an example needs 'tokens' and integer 'acts' ({e})") from None


def _feature(obj, where: str) -> FeatureExamples:
  if not isinstance(obj, dict) or "feature" not in obj or "examples" not in obj:
    raise DataError(f"{where}: each line needs 'feature' and 'examples'")
  counts = obj.get("language_counts")
  gran = obj.get("granularity")
  if gran is not None and gran not in HAND_GRANULARITY:
    raise DataError(f"{where}: granularity {gran!r} is not one of 1-4 or null")
  return FeatureExamples(
      int(obj["feature"]), tuple(_example(e, where) for e in obj["examples"]),
      (int(counts["en"]), int(counts["ja"])) if counts else None,
      HAND_GRANULARITY.get(gran))


def read_examples(path: str | Path) -> list[FeatureExamples]:
  """Features in the authors' demo format, one JSON object a line (``.gz``: gzip):
  ``{"feature", "examples": [{"tokens", "acts"}], ["language_counts", "granularity"]}``."""
  path = paths.as_path(path)
  if not path.is_file():
    raise DataError(f"input file {path} does not exist")
  out = []
  try:
    with path.open("rb") as raw, (gzip.open(raw, "rt", encoding="utf-8") if path.suffix == ".gz"
                                  else io.TextIOWrapper(raw, encoding="utf-8")) as f:
      for n, line in enumerate(f, start=1):
        if line.strip():
          out.append(_feature(json.loads(line), f"{path} line {n}"))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path}: {e}") from None
  return out
