"""Hook names: where in a transformer an activation is read (or replaced).

Canonical names, 0-indexed blocks: ``resid_pre.{i}`` (input of block i), ``resid_post.{i}``
(output of block i), ``attn_out.{i}`` and ``mlp_out.{i}`` (the branch outputs added to the
residual). Accepted aliases: TransformerLens/SAELens ``blocks.{i}.hook_resid_post`` (and
``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``), and ``layers.{i}`` (the Hugging Face
module path, i.e. the output of block i, as sparsify and llm-jp-sae use).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sae_jax.errors import ConfigError

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_CANON = re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)$")
_TLENS = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_HF = re.compile(r"^(?:model\.)?layers\.(\d+)$")


class Hook(NamedTuple):
  kind: str
  layer: int

  @property
  def name(self) -> str:
    return f"{self.kind}.{self.layer}"

  @property
  def blocks_needed(self) -> int:
    """How many blocks must run to produce this activation."""
    return self.layer if self.kind == "resid_pre" else self.layer + 1


def parse_hook(name: str, n_layers: int | None = None) -> Hook:
  """A hook name or alias -> Hook; ConfigError naming it if unknown or past the last block."""
  if m := _CANON.match(name):
    hook = Hook(m.group(1), int(m.group(2)))
  elif m := _TLENS.match(name):
    hook = Hook(m.group(2), int(m.group(1)))
  elif m := _HF.match(name):
    hook = Hook("resid_post", int(m.group(1)))
  else:
    raise ConfigError(f"unknown hook {name!r}; use {'|'.join(KINDS)}.<block>, "
                      "blocks.<block>.hook_<kind> or layers.<block>")
  if n_layers is not None and hook.layer >= n_layers:
    raise ConfigError(f"hook {name!r} is past the last block: the model has {n_layers} blocks "
                      f"(0..{n_layers - 1})")
  return hook
